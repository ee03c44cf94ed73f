"""Invoices (SPEC §5.4): `invoice.payment_failed`, `invoice.payment_succeeded`, `invoice.paid`.

An invoice counts only for a live subscription of the organization
(`billing.stripe.invoices.invoice_effect`); its events are ordered by that subscription's invoice
marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.stripe_frame import Outcome, bought_at
from activities.stripe_subscriptions import SubscriptionActivities
from billing.ledger import EntryKind
from billing.models import StripeApply, StripeStep, SubscriptionState
from billing.store.database import Doc
from billing.store.documents import LotTerms
from billing.stripe import orgs
from billing.stripe.events import (
    INVOICE_FAILED,
    INVOICE_FAMILY,
    INVOICE_PAID_TYPES,
    Marker,
    is_stale,
)
from billing.stripe.invoices import (
    InvoiceEffect,
    InvoicePack,
    invoice_effect,
    invoice_lines,
    invoice_packs,
    invoice_payment,
    invoice_subscription,
)
from billing.stripe.objects import Obj, amount, ref_id, timestamp, whole_list


@dataclass(frozen=True)
class _Invoice:
    """One invoice event being applied, with what was read for it before the transaction."""

    apply: StripeApply
    packs: list[InvoicePack]
    payment_intent: str | None
    charge: str | None

    @property
    def object(self) -> Obj:
        return self.apply.event.object

    @property
    def failed(self) -> bool:
        return self.apply.event.type == INVOICE_FAILED

    @property
    def customer(self) -> str | None:
        return ref_id(self.object.get("customer"))

    @property
    def sub_id(self) -> str | None:
        return invoice_subscription(self.object)

    @property
    def marker(self) -> Marker:
        return Marker(self.apply.event.created, self.apply.event.id)

    @property
    def fetched(self) -> Obj | None:
        """The invoice's subscription as Stripe holds it, when the workflow read it."""
        fetched = self.apply.subscription
        return fetched if fetched is not None and fetched.get("id") == self.sub_id else None


class InvoiceActivities(SubscriptionActivities):
    @activity.defn(name="stripe_subscription_state")
    async def subscription_state(self, apply: StripeApply) -> SubscriptionState:
        """The organization an invoice belongs to and its subscription's status (read only)."""
        invoice = apply.event.object
        sub_id = invoice_subscription(invoice)
        doc = await self.subscriptions.subscription(sub_id) if sub_id else None
        known = (doc or {}).get("org_id")
        linked = await self.subscriptions.org_for_customer(ref_id(invoice.get("customer"))) if (
            orgs.needs_customer_link(named=apply.org_id, subscription_org=known)) else None
        return SubscriptionState(
            org_id=orgs.resolve_org(named=apply.org_id, subscription_org=known,
                                    customer_org=linked),
            status=(doc or {}).get("status"))

    @activity.defn(name="apply_stripe_invoice")
    async def apply_invoice(self, apply: StripeApply) -> StripeStep:
        """A failed invoice of a live subscription makes it past due (first failure date kept)
        and notifies; a paid one recovers a delinquent subscription, with its plan read again
        from the subscription the workflow fetched, and credits every pack line it bills
        (`_paid_packs`), whatever the order of its events. Any other invoice notifies at most."""
        packs, (payment_intent, charge) = await self._paid_packs(apply)
        invoice = _Invoice(apply, packs, payment_intent, charge)
        return await self._run(apply, partial(self._apply_invoice_in, invoice))

    async def _apply_invoice_in(self, invoice: _Invoice, session: AsyncClientSession,
                                outcome: Outcome) -> None:
        apply = invoice.apply
        sub_id = invoice.sub_id
        doc = await self.subscriptions.subscription(sub_id, session) if sub_id else None
        # The invoice's and its subscription's metadata, then the subscription as the engine
        # knows it, and only last the customer's link (SPEC §5.5).
        if not await self._resolve_org(session, outcome, invoice.customer,
                                       objects=(invoice.fetched,),
                                       subscription_org=(doc or {}).get("org_id")):
            return
        assert outcome.org_id is not None
        await self.runtime.accounts.ensure_in(session, outcome.org_id, apply.now)
        learnt = doc is None and sub_id is not None and invoice.fetched is not None
        if learnt:
            doc = await self._learn_in(session, outcome, invoice)
        if doc is not None and doc.get("org_id") != outcome.org_id:
            doc = None  # another organization's subscription: not this one's to change
        # Before the ordering marker: a pack line is credited once by its key, whichever of the
        # invoice's events comes first or late.
        await self._credit_packs_in(session, outcome, invoice)
        if doc is not None and is_stale(self.subscriptions.marker(doc, INVOICE_FAMILY),
                                        invoice.marker):
            if outcome.written:
                return outcome.set("applied", "its pack lines only: older than subscription "
                                              f"{sub_id}'s invoice marker")
            return outcome.set("stale", f"older than subscription {sub_id}'s invoice marker")
        effect = invoice_effect(invoice.failed, doc.get("status") if doc else None)
        if doc is not None:
            await self._invoice_status_in(session, outcome, invoice, doc, effect)
        if effect.status is not None:
            outcome.written.append(f"subscription {sub_id} {effect.status}")
        if effect.status is not None or learnt:
            # A subscription learnt here moves the standing (and links its customer, as its own
            # events would) even when the invoice does not count: those late events will be
            # stale against the marker just written.
            link = ({"stripe_customer_id": ref_id((invoice.fetched or {}).get("customer"))
                     or invoice.customer} if learnt else None)
            await self._standing(session, outcome, link)
        if invoice.failed:
            await self._notify_failed_in(session, outcome, invoice)
        if effect.status is None and not outcome.written:
            outcome.set("ignored", effect.reason)
        return None

    async def _learn_in(self, session: AsyncClientSession, outcome: Outcome,
                        invoice: _Invoice) -> Doc | None:
        """A subscription the engine has not heard of yet (its own events are late): take its
        state as Stripe holds it now, newer than any event created so far."""
        assert invoice.fetched is not None and invoice.sub_id is not None
        await self.save_subscription_in(session, outcome, invoice.fetched, None,
                                        marker=Marker(int(invoice.apply.now.timestamp()), ""))
        return await self.subscriptions.subscription(invoice.sub_id, session)

    async def _credit_packs_in(self, session: AsyncClientSession, outcome: Outcome,
                               invoice: _Invoice) -> None:
        """One lot per pack line the invoice bills, keyed `invoice:<in>:<line>`."""
        apply = invoice.apply
        assert outcome.org_id is not None
        for index, pack in enumerate(invoice.packs):
            line = pack.line
            outcome.ledger(await self.runtime.ledger.write_in(
                session, outcome.org_id, key=pack.key, kind=EntryKind.TOPUP, amount=line.units,
                now=apply.now,
                memo=f"pack {line.pack.id} x{line.quantity} on {invoice.object['id']}",
                terms=LotTerms(
                    expires_at=line.expires_at(bought_at(apply)),
                    payment_intent=invoice.payment_intent, charge=invoice.charge,
                    pack_id=line.pack.id, price_cents=line.price_cents, line=index + 1,
                    paid_cents=amount(invoice.object.get("amount_paid")) or None),
                meta={"stripe_event": apply.event.id}))

    async def _invoice_status_in(self, session: AsyncClientSession, outcome: Outcome,
                                 invoice: _Invoice, doc: Doc, effect: InvoiceEffect) -> None:
        """The subscription's status as the invoice leaves it, under its invoice marker; a
        recovery reads the plan again from the subscription the workflow fetched."""
        assert outcome.org_id is not None
        fields: dict[str, object] = {}
        if effect.status == "past_due":
            fields.update(status="past_due", past_due_since=(
                doc.get("past_due_since") or timestamp(invoice.apply.event.created)))
        elif effect.status is not None:
            fields.update(status=effect.status, past_due_since=None)
        await self.subscriptions.save_in(session, str(doc["_id"]), outcome.org_id,
                                         fields=fields, now=invoice.apply.now,
                                         family=INVOICE_FAMILY, marker=invoice.marker)
        outcome.written.append(f"subscription {doc['_id']} invoice marker")
        if effect.reread_plan and invoice.fetched is not None:
            await self.save_subscription_in(session, outcome, invoice.fetched, doc)

    async def _notify_failed_in(self, session: AsyncClientSession, outcome: Outcome,
                                invoice: _Invoice) -> None:
        obj = invoice.object
        await self._notify(
            session, outcome, "payment.failed", f"payment.failed:{invoice.apply.event.id}",
            {"invoice": obj.get("id"), "subscription": invoice.sub_id,
             "amount_due": obj.get("amount_due"), "attempt_count": obj.get("attempt_count")},
        )

    async def _paid_packs(self, apply: StripeApply) -> tuple[list[InvoicePack],
                                                             tuple[str | None, str | None]]:
        """The pack lines of a paid invoice and the payment intent and charge that paid it, read
        from Stripe where the payload does not carry them (read before the transaction)."""
        invoice = apply.event.object
        invoice_id = ref_id(invoice.get("id"))
        if apply.event.type not in INVOICE_PAID_TYPES or invoice_id is None:
            return [], (None, None)
        lines = invoice_lines(invoice)
        if lines is None:
            lines = await self.stripe_api.invoice_lines(invoice_id)
        packs = invoice_packs(self.runtime.config, invoice_id, lines)
        if not packs:
            return [], (None, None)
        payments: list[Obj] | None = None
        if not (ref_id(invoice.get("payment_intent")) or ref_id(invoice.get("charge"))):
            payments = whole_list(invoice.get("payments"))
            if payments is None:
                payments = await self.stripe_api.invoice_payments(invoice_id)
        return packs, invoice_payment(invoice, payments)
