"""The dispute lifecycle (SPEC §5.1): `charge.dispute.created|funds_withdrawn|funds_reinstated|
closed`."""

from __future__ import annotations

from datetime import datetime

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.stripe_frame import Obj, Outcome, StripeFrame, purchase_of
from billing.ledger import EntryKind
from billing.models import StripeApply, StripeStep
from billing.store.documents import PurchasedLot, clawback_recorded
from billing.stripe.disputes import DisputeAction, dispute_action, reinstated_key, withdrawn_key
from billing.stripe.objects import amount, ref_id


class DisputeActivities(StripeFrame):
    @activity.defn(name="apply_stripe_dispute")
    async def apply_dispute(self, apply: StripeApply) -> StripeStep:
        """Opened: notify. Funds withdrawn or lost: claw back the disputed amount once. Funds
        reinstated or won: give back exactly what was clawed back (or, delivered before the
        withdrawal, void it so it never applies)."""
        ledger = self.runtime.ledger
        dispute = apply.event.object
        dp = ref_id(dispute.get("id"))
        charge = ref_id(dispute.get("charge"))
        action = dispute_action(apply.event.type, dispute)
        payload = {"dispute": dp, "charge": charge, "amount": dispute.get("amount"),
                   "reason": dispute.get("reason"), "status": dispute.get("status")}

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if dp is None:
                return outcome.set("unresolved", "the dispute has no id")
            if action is DisputeAction.NONE:
                return outcome.set("ignored",
                                   f"dispute closed as {dispute.get('status')}: nothing to do")
            lots = await self._purchase_lots(session, outcome, charge=charge,
                                             what=f"dispute {dp}")
            if not lots:
                if outcome.kind == "ignored":
                    await self._plan_payment(session, outcome, action, dp, payload)
                return None
            org_id = lots[0]["org_id"]
            lot_ids = [lot["_id"] for lot in lots]
            told = {**payload, "purchase": purchase_of(lots)}
            if action is DisputeAction.OPEN:
                return await self._notify(session, outcome, "dispute.opened",
                                          f"dispute.opened:{dp}", told)
            if action is DisputeAction.WITHDRAW:
                # Before the clawback, whose debit could otherwise trigger the next top-up.
                taken = clawback_recorded(map(PurchasedLot.from_doc, lots), withdrawn_key(dp))
                if not taken and await self._disable_auto_topup(
                        session, lots[0].get("payment_intent"), dp, apply.now):
                    outcome.written.append("auto top-up disabled")
                result = await ledger.clawback_in(
                    session, org_id, key=withdrawn_key(dp), kind=EntryKind.DISPUTE,
                    lot_ids=lot_ids, cents=amount(dispute.get("amount")), now=apply.now,
                    memo=f"dispute {dp} funds withdrawn", meta={"stripe_event": apply.event.id},
                )
                note = "dispute.lost"
            else:
                result = await ledger.reinstate_in(
                    session, org_id, key=reinstated_key(dp), withdrawn_key=withdrawn_key(dp),
                    lot_ids=lot_ids, now=apply.now, memo=f"dispute {dp} funds reinstated",
                )
                note = "dispute.reinstated"
            outcome.ledger(result)
            if not (result.applied or result.notes):
                outcome.set("duplicate", f"dispute {dp} already {action.value}")
            return await self._notify(session, outcome, note, f"{note}:{dp}", told)

        return await self._run(apply, work)

    async def _plan_payment(self, session: AsyncClientSession, outcome: Outcome,
                            action: DisputeAction, dispute: str, payload: Obj) -> None:
        """A dispute of a charge that bought no pack (a plan payment) writes no ledger entry
        but is never silent (SPEC §5.1): the organization (one the engine knows) hears of it,
        `"purchase": null`, with the keys of a pack's dispute, so each is told once."""
        note = PLAN_PAYMENT_NOTES[action]
        if await self._charge_org(session, outcome, known_only=True) is None:
            return
        await self._notify(session, outcome, note, f"{note}:{dispute}",
                           {**payload, "purchase": None})

    async def _disable_auto_topup(self, session: AsyncClientSession, payment_intent: str | None,
                                  dispute: str, now: datetime) -> bool:
        """A dispute on an automatic top-up's payment disables auto top-up (SPEC §5.8): a
        stolen card must not keep buying."""
        if payment_intent is None:
            return False
        return await self.runtime.auto_topups.disable_for_payment_in(
            session, payment_intent=payment_intent, dispute=dispute, now=now)


#: What the feed hears of a dispute of a plan payment: every step of it, as of a pack's.
PLAN_PAYMENT_NOTES = {DisputeAction.OPEN: "dispute.opened", DisputeAction.WITHDRAW: "dispute.lost",
                      DisputeAction.REINSTATE: "dispute.reinstated"}
