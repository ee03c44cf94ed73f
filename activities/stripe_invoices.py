"""Invoices (SPEC §5.4): `invoice.payment_failed`, `invoice.payment_succeeded`, `invoice.paid`.

An invoice counts only for a live subscription of the organization
(`billing.stripe.invoices.invoice_effect`); its events are ordered by that subscription's invoice
marker.
"""

from __future__ import annotations

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.stripe_frame import Outcome, bought_at
from activities.stripe_subscriptions import SubscriptionActivities
from billing.ledger import EntryKind
from billing.models import StripeApply, StripeStep, SubscriptionState
from billing.store.ledger import LotTerms
from billing.stripe import orgs
from billing.stripe.events import (
    INVOICE_FAILED,
    INVOICE_FAMILY,
    INVOICE_PAID_TYPES,
    Marker,
    is_stale,
)
from billing.stripe.invoices import (
    InvoicePack,
    invoice_effect,
    invoice_lines,
    invoice_packs,
    invoice_payment,
    invoice_subscription,
)
from billing.stripe.objects import Obj, amount, ref_id, timestamp, whole_list


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
        event = apply.event
        invoice = event.object
        failed = event.type == INVOICE_FAILED
        customer = ref_id(invoice.get("customer"))
        sub_id = invoice_subscription(invoice)
        marker = Marker(event.created, event.id)
        fetched = apply.subscription
        packs, (payment_intent, charge) = await self._paid_packs(apply)

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            doc = await self.subscriptions.subscription(sub_id, session) if sub_id else None
            # The invoice's and its subscription's metadata, then the subscription as the engine
            # knows it, and only last the customer's link (SPEC §5.5).
            if not await self._resolve_org(
                    session, outcome, customer,
                    objects=(fetched if fetched is not None and fetched.get("id") == sub_id
                             else None,),
                    subscription_org=(doc or {}).get("org_id")):
                return None
            org_id = outcome.org_id
            assert org_id is not None
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
            learnt = False
            if doc is None and sub_id and fetched is not None and fetched.get("id") == sub_id:
                # A subscription the engine has not heard of yet (its own events are late):
                # take its state as Stripe holds it now, newer than any event created so far.
                await self.save_subscription_in(
                    session, outcome, fetched, None,
                    marker=Marker(int(apply.now.timestamp()), ""))
                doc = await self.subscriptions.subscription(sub_id, session)
                learnt = True
            if doc is not None and doc.get("org_id") != org_id:
                doc = None  # another organization's subscription: not this one's to change
            # Before the ordering marker: a pack line is credited once by its key, whichever of
            # the invoice's events comes first or late.
            for index, pack in enumerate(packs):
                line = pack.line
                outcome.ledger(await self.runtime.ledger.write_in(
                    session, org_id, key=pack.key, kind=EntryKind.TOPUP, amount=line.units,
                    now=apply.now, memo=f"pack {line.pack.id} x{line.quantity} on {invoice['id']}",
                    terms=LotTerms(
                        expires_at=line.expires_at(bought_at(apply)),
                        payment_intent=payment_intent, charge=charge, pack_id=line.pack.id,
                        price_cents=line.price_cents, line=index + 1,
                        paid_cents=amount(invoice.get("amount_paid")) or None),
                    meta={"stripe_event": event.id}))
            if doc is not None and is_stale(self.subscriptions.marker(doc, INVOICE_FAMILY),
                                            marker):
                if outcome.written:
                    return outcome.set("applied", "its pack lines only: older than subscription "
                                                  f"{sub_id}'s invoice marker")
                return outcome.set("stale", f"older than subscription {sub_id}'s invoice marker")
            effect = invoice_effect(failed, doc.get("status") if doc else None)
            if doc is not None:
                fields: dict[str, object] = {}
                if effect.status == "past_due":
                    fields.update(status="past_due", past_due_since=(
                        doc.get("past_due_since") or timestamp(event.created)))
                elif effect.status is not None:
                    fields.update(status=effect.status, past_due_since=None)
                await self.subscriptions.save_in(session, str(doc["_id"]), org_id,
                                                 fields=fields, now=apply.now,
                                                 family=INVOICE_FAMILY, marker=marker)
                outcome.written.append(f"subscription {doc['_id']} invoice marker")
                if effect.reread_plan and fetched is not None and fetched.get("id") == sub_id:
                    await self.save_subscription_in(session, outcome, fetched, doc)
            if effect.status is not None:
                outcome.written.append(f"subscription {sub_id} {effect.status}")
            if effect.status is not None or learnt:
                # A subscription learnt here moves the standing (and links its customer, as its
                # own events would) even when the invoice does not count: those late events
                # will be stale against the marker just written.
                link = ({"stripe_customer_id": ref_id((fetched or {}).get("customer")) or customer}
                        if learnt else None)
                await self._standing(session, outcome, link)
            if failed:
                await self._notify(
                    session, outcome, "payment.failed", f"payment.failed:{event.id}",
                    {"invoice": invoice.get("id"), "subscription": sub_id,
                     "amount_due": invoice.get("amount_due"),
                     "attempt_count": invoice.get("attempt_count")},
                )
            if effect.status is None and not outcome.written:
                outcome.set("ignored", effect.reason)
            return None

        return await self._run(apply, work)

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
