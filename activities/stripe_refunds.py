"""Refunds (SPEC §5.1): `charge.refunded`, `refund.created|updated|failed`,
`charge.refund.updated`."""

from __future__ import annotations

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.stripe_frame import Outcome, StripeFrame, purchase_of
from billing.ledger import EntryKind
from billing.models import StripeApply, StripeStep
from billing.stripe.events import CHARGE_REFUNDED
from billing.stripe.objects import Obj, amount, ref_id
from billing.stripe.refunds import (
    RefundAction,
    refund_action,
    refund_key,
    refund_scope,
    reversal_key,
)


class RefundActivities(StripeFrame):
    @activity.defn(name="apply_stripe_refunds")
    async def apply_refunds(self, apply: StripeApply) -> StripeStep:
        """Claw back every pending or succeeded refund of the charge from the lots it bought
        (`refund:<re id>`), and give back exactly what a failed or canceled one took
        (`refund:<re id>:reversed`, `refund.reversed`)."""
        obj = apply.event.object
        charge = ref_id(obj.get("id") if apply.event.type == CHARGE_REFUNDED else obj.get("charge"))
        refunds = [(r, refund_action(r)) for r in apply.refunds or []]
        ledger = self.runtime.ledger

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if any(ref_id(r.get("id")) is None for r, _ in refunds):
                raise ValueError("a refund without an id")  # Stripe never sends one
            acted: list[tuple[Obj, RefundAction]] = [
                (r, action) for r, action in refunds if action is not RefundAction.NONE]
            if not acted:
                return outcome.set("ignored", "no refund to claw back or give back")
            lots = await self._purchase_lots(session, outcome, charge=charge,
                                             what=f"refund of {charge}")
            if not lots:
                if outcome.kind == "unresolved":
                    await self._unresolved(session, outcome, charge, acted)
                elif outcome.kind == "ignored":
                    await self._plan_payment(session, outcome, charge, acted)
                return None
            org_id = lots[0]["org_id"]
            lot_ids = [lot["_id"] for lot in lots]
            outcome.set("duplicate", "every refund was already applied")
            for refund, action in acted:
                refund_id = str(refund["id"])
                if action is RefundAction.CLAW:
                    result = await ledger.clawback_in(
                        session, org_id, key=refund_key(refund_id), kind=EntryKind.REFUND,
                        lot_ids=lot_ids, cents=amount(refund.get("amount")), now=apply.now,
                        memo=f"refund of {charge or lots[0].get('payment_intent')}",
                        meta={"stripe_event": apply.event.id}, scope=refund_scope(refund),
                    )
                else:
                    result = await ledger.reinstate_in(
                        session, org_id, key=reversal_key(refund_id),
                        withdrawn_key=refund_key(refund_id), lot_ids=lot_ids, now=apply.now,
                        memo=f"refund {refund_id} {refund.get('status')}: given back",
                    )
                    if result.applied or result.notes:
                        await self._notify(
                            session, outcome, "refund.reversed", f"refund.reversed:{refund_id}",
                            {"refund": refund_id, "charge": charge, "status": refund.get("status"),
                             "units": result.amount, "purchase": purchase_of(lots)},
                        )
                outcome.ledger(result)
                if result.applied or result.notes:
                    outcome.set("applied")
            return None

        return await self._run(apply, work)

    async def _plan_payment(self, session: AsyncClientSession, outcome: Outcome,
                            charge: str | None, refunds: list[tuple[Obj, RefundAction]]
                            ) -> None:
        """A refund of a charge that bought no pack (a plan payment) writes no ledger entry but
        is never silent (SPEC §5.1): the organization (one the engine knows) hears
        `refund.created` once per refund (key `refund.created:<re id>`, whichever event carries
        it), `"purchase": null`. A refund that failed or was canceled gave nothing back: nothing
        to tell."""
        created = [r for r, action in refunds if action is RefundAction.CLAW]
        if not created or await self._charge_org(session, outcome, known_only=True) is None:
            return
        for refund in created:
            refund_id = str(refund["id"])
            await self._notify(
                session, outcome, "refund.created", f"refund.created:{refund_id}",
                {"refund": refund_id, "charge": charge, "amount": refund.get("amount"),
                 "reason": refund.get("reason"), "status": refund.get("status"),
                 "purchase": None},
            )

    async def _unresolved(self, session: AsyncClientSession, outcome: Outcome,
                          charge: str | None, refunds: list[tuple[Obj, RefundAction]]
                          ) -> None:
        """No purchase can be told for this charge: write nothing, tell the organization."""
        if await self._charge_org(session, outcome) is not None:
            await self._notify(
                session, outcome, "refund.unresolved",
                f"refund.unresolved:{outcome.apply.event.id}",
                {"charge": charge, "refunds": [r.get("id") for r, _ in refunds],
                 "amount": sum(amount(r.get("amount")) for r, _ in refunds)},
            )
