"""Pack purchases (SPEC §5.1, §5.5): `checkout.session.completed`,
`checkout.session.async_payment_succeeded|failed` and `payment_intent.succeeded`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.stripe_api import StripeApiActivities
from activities.stripe_frame import Outcome, StripeFrame, bought_at, malformed_object
from billing.ledger import EntryKind
from billing.models import PurchaseFacts, StripeApply, StripeStep
from billing.runtime import Runtime
from billing.store.database import Doc
from billing.store.documents import LotTerms
from billing.stripe.events import PAYMENT_INTENT_SUCCEEDED
from billing.stripe.objects import amount, org_from, ref_id
from billing.stripe.purchases import (
    Purchase,
    Verdict,
    line_key,
    purchase_key,
    resolve_purchase,
)


@dataclass(frozen=True)
class _Payment:
    """One payment being credited: the event and what Stripe holds about it."""

    apply: StripeApply
    facts: PurchaseFacts

    @property
    def session_id(self) -> str | None:
        return ref_id((self.facts.session or {}).get("id"))

    @property
    def payment_intent(self) -> str | None:
        return self.facts.payment_intent

    @property
    def charge(self) -> str | None:
        return ref_id((self.facts.intent or {}).get("latest_charge"))

    @property
    def paid(self) -> int:
        return amount((self.facts.session or {}).get("amount_total")) or amount(
            (self.facts.intent or {}).get("amount_received"))

    @property
    def customer(self) -> str | None:
        return ref_id((self.facts.session or {}).get("customer")) or ref_id(
            (self.facts.intent or {}).get("customer"))


class PurchaseActivities(StripeFrame):
    def __init__(self, runtime: Runtime, stripe_api: StripeApiActivities) -> None:
        super().__init__(runtime)
        self.stripe_api = stripe_api

    async def _read_facts(self, apply: StripeApply) -> StripeApply:
        """The purchase behind a paid Checkout session or a succeeded payment intent, read from
        Stripe (`apply_purchase` finds the organization it names)."""
        obj = apply.event.object
        if apply.event.type == PAYMENT_INTENT_SUCCEEDED:
            facts = await self.stripe_api.purchase_facts(ref_id(obj.get("id")), intent=obj)
        else:
            facts = await self.stripe_api.purchase_facts(ref_id(obj.get("payment_intent")),
                                                         session=obj)
        return apply.model_copy(update={"purchase": facts})

    @activity.defn(name="read_and_apply_stripe_purchase")
    async def read_and_apply_purchase(self, apply: StripeApply) -> StripeStep:
        """Read the purchase from Stripe, then credit it (`apply_purchase`)."""
        with malformed_object(apply):
            apply = await self._read_facts(apply)
        return await self.apply_purchase(apply)

    async def apply_purchase(self, apply: StripeApply) -> StripeStep:
        """Credit every pack line of a payment once: one lot per line, keyed on the payment
        intent (`payment:<pi>`, `payment:<pi>:2`, ...), so every event of one payment credits
        once whichever arrives first."""
        payment = _Payment(apply, apply.purchase or PurchaseFacts())
        return await self._run(apply, partial(self._apply_purchase_in, payment))

    async def _apply_purchase_in(self, payment: _Payment, session: AsyncClientSession,
                                 outcome: Outcome) -> None:
        facts = payment.facts
        record = await self._checkout(session, outcome, (facts.session, facts.intent))
        purchase = self._purchase(facts, record, payment.paid)
        if purchase.verdict is Verdict.IGNORED:
            return outcome.set("ignored", purchase.reason)
        if payment.payment_intent is None and payment.session_id is None:
            return outcome.set("unresolved", "the purchase names no payment intent or session")
        if purchase.verdict is Verdict.UNRESOLVED:
            return await self._unresolved_in(session, outcome, payment, purchase)
        # Metadata of the session, then of the payment intent, before any customer link: one
        # customer may pay for several organizations (SPEC §5.5).
        if not await self._resolve_org(session, outcome, payment.customer,
                                       objects=(facts.session,), intent=facts.intent):
            return None
        pi = payment.payment_intent
        if pi and await self.runtime.ledger.paid_for_in(session, pi):
            return outcome.set("duplicate", f"payment {pi} already credited")
        if not await self._credit_lines_in(session, outcome, payment, purchase):
            base = purchase_key(pi, payment.session_id)
            outcome.set("duplicate", f"ledger key {base} already written")
        return None

    async def _unresolved_in(self, session: AsyncClientSession, outcome: Outcome,
                             payment: _Payment, purchase: Purchase) -> None:
        """A pack was bought but which one cannot be told: nothing is credited, and the
        organization, when known, is told (`purchase.unresolved`)."""
        outcome.set("unresolved", purchase.reason)
        facts = payment.facts
        org_id = await self._find_org(session, outcome, (payment.customer,),
                                      objects=(facts.session,), intent=facts.intent)
        if org_id is None:
            return
        await self.runtime.accounts.ensure_in(session, org_id, payment.apply.now)
        await self._notify(
            session, outcome, "purchase.unresolved",
            f"purchase.unresolved:{payment.payment_intent or payment.session_id}",
            {"payment_intent": payment.payment_intent, "checkout_session": payment.session_id,
             "reason": purchase.reason, "event": payment.apply.event.id},
        )

    async def _credit_lines_in(self, session: AsyncClientSession, outcome: Outcome,
                               payment: _Payment, purchase: Purchase) -> bool:
        """One lot per pack line; whether any was credited (not all keys written before)."""
        apply = payment.apply
        org_id = outcome.org_id
        assert org_id is not None
        opening = self.runtime.accounts.opening(org_id, apply.now)
        base = purchase_key(payment.payment_intent, payment.session_id)
        credited = False
        for index, line in enumerate(purchase.lines):
            result = await self.runtime.ledger.write_in(
                session, org_id, key=line_key(base, index), kind=EntryKind.TOPUP,
                amount=line.units, now=apply.now, memo=f"pack {line.pack.id} x{line.quantity}",
                terms=LotTerms(
                    expires_at=line.expires_at(bought_at(apply)),
                    payment_intent=payment.payment_intent, charge=payment.charge,
                    checkout_session=payment.session_id, pack_id=line.pack.id,
                    price_cents=line.price_cents, paid_cents=payment.paid, line=index + 1,
                ),
                meta={"stripe_event": apply.event.id}, opening=opening,
                # `payment:<pi>` keys: `paid_for_in` just found none written.
                unused_key=bool(payment.payment_intent),
            )
            outcome.ledger(result)
            credited = credited or result.applied
        return credited

    def _purchase(self, facts: PurchaseFacts, record: Doc | None, paid: int) -> Purchase:
        """What the payment bought (`resolve_purchase`): the engine's checkout record names the
        pack before any metadata does (SPEC §5.9); the lines still say how many were paid."""
        return resolve_purchase(
            self.runtime.config, metadata=(facts.session, facts.intent),
            recorded_pack=record["request"]["pack_id"] if record else None,
            line_items=facts.line_items if facts.session is not None else None,
            paid_cents=paid, invoice=ref_id((facts.intent or {}).get("invoice")),
            names_org=record is not None or org_from(facts.session, facts.intent) is not None)

    @activity.defn(name="apply_stripe_purchase_failed")
    async def apply_purchase_failed(self, apply: StripeApply) -> StripeStep:
        """A delayed payment method (SEPA, ACH, Bacs, boleto) failed: nothing was credited;
        tell the organization (`purchase.failed`)."""
        checkout = apply.event.object
        session_id = ref_id(checkout.get("id"))

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            org_id = await self._find_org(session, outcome, (ref_id(checkout.get("customer")),),
                                          objects=(checkout,))
            if org_id is None:
                return outcome.set("ignored", "failed payment of no known organization")
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
            return await self._notify(
                session, outcome, "purchase.failed", f"purchase.failed:{session_id}",
                {"checkout_session": session_id,
                 "payment_intent": ref_id(checkout.get("payment_intent")),
                 "amount_total": checkout.get("amount_total")},
            )

        return await self._run(apply, work)
