"""Applying Stripe events (SPEC §5.1, §5.4, §5.5): each activity is ONE MongoDB transaction.

The transaction holds the event's whole effect: the ledger change, the subscription state and its
ordering marker, the notifications, and the `stripe_events` record of the outcome. A crash at any
point leaves either all of it or none of it, and a retried activity finds the record and writes
nothing twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import final_on_bad_input
from billing import stripe_events as se
from billing.clock import utcnow
from billing.ledger import EntryKind
from billing.metrics import STRIPE_EVENTS
from billing.models import (
    StripeApply,
    StripeEventOutcome,
    StripeOutcomeKind,
    SubscriptionState,
)
from billing.runtime import Runtime
from billing.store import events
from billing.store.ledger import LedgerResult, LotTerms
from billing.store.meters import Meters
from billing.store.notifications import notify
from billing.store.subscriptions import STATUS_NONE, Subscriptions
from billing.store.transactions import run_in_transaction

Obj = dict[str, Any]
Work = Callable[[AsyncClientSession, "Outcome"], Awaitable[None]]


class Outcome:
    """The outcome being built inside a transaction: what was decided and what was written."""

    def __init__(self, apply: StripeApply) -> None:
        self.apply = apply
        self.kind: StripeOutcomeKind = "applied"
        self.org_id: str | None = apply.org_id
        self.reason: str | None = None
        self.written: list[str] = []

    def set(self, kind: StripeOutcomeKind, reason: str | None = None) -> None:
        self.kind = kind
        self.reason = reason

    def ledger(self, result: LedgerResult) -> None:
        if result.applied and result.entry is not None:
            entry = result.entry
            self.written.append(f"ledger {entry['key']} {entry['amount']:+d}")

    def result(self) -> StripeEventOutcome:
        return StripeEventOutcome(
            event_id=self.apply.event.id, type=self.apply.event.type, outcome=self.kind,
            org_id=self.org_id, reason=self.reason, written=self.written,
        )


class StripeEventActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.subscriptions = Subscriptions(runtime.db)
        self.meters = Meters(runtime.db, runtime.config)

    # ---- the shared frame ------------------------------------------------------------------

    async def _run(self, apply: StripeApply, work: Work) -> StripeEventOutcome:
        """Run `work` and record its outcome in one transaction; an event already recorded
        (a retried activity, or a redelivery after the workflow history is gone) is a no-op,
        unless it was recorded `unresolved`."""
        db = self.runtime.db

        async def txn(session: AsyncClientSession) -> StripeEventOutcome:
            prior = await events.recorded_in(db, session, apply.event.id)
            # An `unresolved` event wrote nothing: running it again (`billing replay`, once what
            # it lacked, say the purchase of a refunded pack, has arrived) may resolve it.
            if prior is not None and prior.outcome != "unresolved":
                return prior.model_copy(update={
                    "outcome": "duplicate", "written": [],
                    "reason": f"event already recorded as {prior.outcome}",
                })
            outcome = Outcome(apply)
            await work(session, outcome)
            result = outcome.result()
            await events.record_in(db, session, apply.event, result, apply.now)
            return result

        with final_on_bad_input():
            try:
                result = await run_in_transaction(db.client, txn)
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                # A Stripe object without a field its type always has, or with a number beyond
                # the 64 bits MongoDB stores: no retry can fix it.
                raise ApplicationError(f"malformed {apply.event.type} object: {exc!r}",
                                       type="MALFORMED_STRIPE_OBJECT",
                                       non_retryable=True) from exc
        STRIPE_EVENTS.labels(result.type, result.outcome).inc()
        activity.logger.info(
            "stripe event %s: %s", result.outcome, result.reason or ", ".join(result.written),
            extra={"org_id": result.org_id, "event_id": result.event_id,
                   "event_type": result.type, "outcome": result.outcome},
        )
        return result

    async def _notify(self, session: AsyncClientSession, outcome: Outcome, type: str, key: str,
                      payload: Obj) -> None:
        assert outcome.org_id is not None
        if await notify(self.runtime.db, session, org_id=outcome.org_id, type=type, key=key,
                        payload=payload, now=outcome.apply.now):
            outcome.written.append(f"notification {type}")

    async def _meter_plan(self, session: AsyncClientSession, outcome: Outcome,
                          plan_id: str | None) -> None:
        """Put the organization on `plan_id` (None keeps its plan) and meter the rest of the week
        on what its subscription status now pays for (call after writing the status)."""
        assert outcome.org_id is not None
        account = await self.runtime.db.accounts.find_one({"_id": outcome.org_id},
                                                          session=session)
        current = (account or {}).get("plan_id")
        target = plan_id or current or self.runtime.config.default_plan.id
        # The week is the one this write lands in (a retry may land after the weekly reset),
        # not the one the workflow started in.
        changed = await self.meters.apply_plan_change_in(session, outcome.org_id, target,
                                                         utcnow())
        if changed or current != target:
            outcome.written.append(f"plan {current} -> {target}")

    async def _resolve_org(self, session: AsyncClientSession, outcome: Outcome,
                           customer: str | None) -> bool:
        """Metadata first (already in `org_id`), then the account linked to the customer."""
        if outcome.org_id is None:
            outcome.org_id = await self.subscriptions.org_for_customer(customer, session)
        if outcome.org_id is None:
            outcome.set("unresolved", f"no organization in metadata or linked to {customer}")
            return False
        return True

    @activity.defn(name="record_stripe_outcome")
    async def record_outcome(self, apply: StripeApply) -> StripeEventOutcome:
        """Record an outcome the workflow decided without a change (ignored, unresolved)."""

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            outcome.set(apply.outcome or "ignored", apply.reason)

        return await self._run(apply, work)

    # ---- pack purchases --------------------------------------------------------------------

    @activity.defn(name="apply_stripe_purchase")
    async def apply_purchase(self, apply: StripeApply) -> StripeEventOutcome:
        """Credit a pack once per purchase, keyed on the payment intent (SPEC §5.1)."""
        config = self.runtime.config
        ledger = self.runtime.ledger
        obj = apply.event.object
        is_checkout = apply.event.type == "checkout.session.completed"
        # Ids go through `ref_id`: only a string is an id, never an object (a query operator).
        payment_intent = se.ref_id(obj.get("payment_intent" if is_checkout else "id"))
        session_id = se.ref_id(obj.get("id")) if is_checkout else None
        charge = None if is_checkout else se.ref_id(obj.get("latest_charge"))

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if payment_intent is None and session_id is None:
                return outcome.set("unresolved", "the purchase names no payment intent or session")
            quantity = 1
            if apply.pack_id is not None:
                pack = config.packs_by_id.get(apply.pack_id)
                if pack is None:
                    return outcome.set("unresolved", f"unknown pack {apply.pack_id!r}")
            elif apply.line_items is not None:
                choice = se.pack_from_line_items(config, apply.line_items)
                if choice.pack is None:
                    return outcome.set("unresolved" if choice.ambiguous else "ignored",
                                       choice.reason)
                pack, quantity = choice.pack, choice.quantity
            else:
                return outcome.set("ignored", "no pack in metadata: not a credit purchase")
            if not await self._resolve_org(session, outcome, se.ref_id(obj.get("customer"))):
                return None
            org_id = outcome.org_id
            assert org_id is not None
            if payment_intent and await self.runtime.db.lots.find_one(
                {"payment_intent": payment_intent, "kind": EntryKind.TOPUP.value},
                {"org_id": 1}, session=session,
            ):
                return outcome.set("duplicate", f"payment {payment_intent} already credited")
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
            paid = int((obj.get("amount_total") if is_checkout
                        else obj.get("amount_received") or obj.get("amount")) or 0)
            expires = (apply.now + timedelta(days=pack.expiry_days)) if pack.expiry_days else None
            key = f"payment:{payment_intent}" if payment_intent else f"checkout:{session_id}"
            result = await ledger.write_in(
                session, org_id, key=key, kind=EntryKind.TOPUP, amount=pack.units * quantity,
                now=apply.now, memo=f"pack {pack.id} x{quantity}",
                terms=LotTerms(
                    expires_at=expires, payment_intent=payment_intent, charge=charge,
                    checkout_session=session_id, pack_id=pack.id,
                    price_cents=paid if paid > 0 else pack.price_cents * quantity,
                ),
                meta={"stripe_event": apply.event.id},
            )
            outcome.ledger(result)
            if not result.applied:
                outcome.set("duplicate", f"ledger key {key} already written")
            return None

        return await self._run(apply, work)

    # ---- refunds and disputes --------------------------------------------------------------

    async def _purchase_lot(self, apply: StripeApply, *, charge: str | None) -> Obj | None:
        """The lot bought with the charge: payment intent ids and charge ids are unique across
        Stripe, so the lot also tells whose purchase it was."""
        payment_intent = apply.payment_intent or se.ref_id(apply.event.object.get("payment_intent"))
        return await self.runtime.ledger.find_purchase_lot(
            None, payment_intent=payment_intent, charge=charge
        )

    async def _unresolved_clawback(self, session: AsyncClientSession, outcome: Outcome,
                                   customer: str | None, payload: Obj) -> None:
        """No purchased lot for this charge: write nothing, tell the organization if known."""
        outcome.set("unresolved", "no credit pack purchase matches this charge")
        if outcome.org_id is None:
            outcome.org_id = await self.subscriptions.org_for_customer(customer, session)
        if outcome.org_id is not None:
            await self._notify(session, outcome, "refund.unresolved",
                               f"refund.unresolved:{outcome.apply.event.id}", payload)

    @activity.defn(name="apply_stripe_refunds")
    async def apply_refunds(self, apply: StripeApply) -> StripeEventOutcome:
        """Claw back every refund of the charge from the lot it bought (`refund:<re id>`)."""
        obj = apply.event.object
        is_charge = apply.event.type == "charge.refunded"
        charge = se.ref_id(obj.get("id") if is_charge else obj.get("charge"))
        refunds = [r for r in (apply.refunds or []) if se.counts_as_refunded(r)]
        lot = await self._purchase_lot(apply, charge=charge)

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if lot is None and se.pack_from(obj) is not None:
                # The charge names a pack, so its purchase exists and is not credited yet
                # (Stripe does not order deliveries). Retry, and fail visibly if it never is,
                # rather than record the refund as unresolved and never claw it back.
                raise ApplicationError(
                    f"refund of {charge}: the pack purchase is not credited yet",
                    type="PURCHASE_NOT_CREDITED_YET",
                )
            if lot is None:
                return await self._unresolved_clawback(
                    session, outcome, se.ref_id(obj.get("customer")),
                    {"charge": charge, "refunds": [r.get("id") for r in refunds],
                     "amount": sum(int(r.get("amount") or 0) for r in refunds)},
                )
            outcome.org_id = lot["org_id"]
            if not refunds:
                return outcome.set("ignored", "the charge has no succeeded refund")
            outcome.set("duplicate", "every refund was already clawed back")
            for refund in refunds:
                result = await self.runtime.ledger.clawback_in(
                    session, lot["org_id"], key=f"refund:{refund['id']}", kind=EntryKind.REFUND,
                    lot_id=lot["_id"], cents=int(refund["amount"]), now=apply.now,
                    memo=f"refund of {charge or lot.get('payment_intent')}",
                    meta={"stripe_event": apply.event.id},
                )
                outcome.ledger(result)
                if result.applied or "clawed_units" in result.notes:
                    outcome.set("applied")
            return None

        return await self._run(apply, work)

    @activity.defn(name="apply_stripe_dispute")
    async def apply_dispute(self, apply: StripeApply) -> StripeEventOutcome:
        """The dispute lifecycle: opened (notify), funds withdrawn or lost (claw back the
        disputed amount once), funds reinstated or won (give back exactly what was clawed)."""
        ledger = self.runtime.ledger
        dispute = apply.event.object
        dp = se.ref_id(dispute.get("id"))
        charge = se.ref_id(dispute.get("charge"))
        lot = await self._purchase_lot(apply, charge=charge)
        kind = apply.event.type.removeprefix("charge.dispute.")
        status = dispute.get("status")
        withdraw = kind == "funds_withdrawn" or (kind == "closed" and status == "lost")
        reinstate = kind == "funds_reinstated" or (kind == "closed" and status == "won")
        payload = {"dispute": dp, "charge": charge, "amount": dispute.get("amount"),
                   "reason": dispute.get("reason"), "status": status}

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if lot is not None:
                outcome.org_id = lot["org_id"]
            if dp is None:
                return outcome.set("unresolved", "the dispute has no id")
            if kind == "created":
                if outcome.org_id is None:
                    return outcome.set("unresolved", "no organization for the disputed charge")
                return await self._notify(session, outcome, "dispute.opened",
                                          f"dispute.opened:{dp}", payload)
            if not (withdraw or reinstate):
                return outcome.set("ignored", f"dispute closed as {status}: nothing to do")
            if lot is None:
                return await self._unresolved_clawback(session, outcome, None, payload)
            if withdraw:
                result = await ledger.clawback_in(
                    session, lot["org_id"], key=f"dispute:{dp}:withdrawn", kind=EntryKind.DISPUTE,
                    lot_id=lot["_id"], cents=int(dispute.get("amount") or 0), now=apply.now,
                    memo=f"dispute {dp} funds withdrawn", meta={"stripe_event": apply.event.id},
                )
                note = "dispute.lost"
            else:
                result = await ledger.reinstate_in(
                    session, lot["org_id"], key=f"dispute:{dp}:reinstated",
                    withdrawn_key=f"dispute:{dp}:withdrawn", now=apply.now,
                    memo=f"dispute {dp} funds reinstated",
                )
                if result.notes.get("reason") == "not_withdrawn":
                    if kind == "funds_reinstated":
                        # Funds can only come back after they left: the withdrawal event is
                        # late. Retry, and fail visibly if it never comes, rather than record
                        # this event and later claw back for good.
                        raise ApplicationError(
                            f"dispute {dp}: funds reinstated before the withdrawal was applied",
                            type="DISPUTE_WITHDRAWAL_PENDING",
                        )
                    return outcome.set("ignored", "no funds were withdrawn for this dispute")
                note = "dispute.reinstated"
            outcome.ledger(result)
            if not (result.applied or result.notes):
                outcome.set("duplicate", f"dispute {dp} already {kind}")
            return await self._notify(session, outcome, note, f"{note}:{dp}", payload)

        return await self._run(apply, work)

    # ---- subscriptions and invoices --------------------------------------------------------

    @activity.defn(name="stripe_subscription_state")
    async def subscription_state(self, apply: StripeApply) -> SubscriptionState:
        """The organization an invoice belongs to and its status (read only)."""
        org = apply.org_id or await self.subscriptions.org_for_customer(
            se.ref_id(apply.event.object.get("customer")))
        doc = await self.subscriptions.get(org) if org else None
        return SubscriptionState(org_id=org, status=(doc or {}).get("status", STATUS_NONE))

    async def _stale(self, session: AsyncClientSession, outcome: Outcome,
                     family: str) -> tuple[se.Marker, bool]:
        assert outcome.org_id is not None
        event = outcome.apply.event
        marker = se.Marker(event.created, event.id)
        doc = await self.subscriptions.get(outcome.org_id, session)
        current = self.subscriptions.marker(doc, family)
        if se.is_stale(current, marker):
            outcome.set("stale", f"older than the {family} marker {current}")
            return marker, True
        return marker, False

    async def _apply_plan(self, session: AsyncClientSession, outcome: Outcome,
                          choice: se.PlanChoice) -> None:
        if choice.plan_id is None:
            await self._notify(
                session, outcome, "plan.unresolved", f"plan.unresolved:{outcome.apply.event.id}",
                {"prices": list(choice.unknown_prices), "status": choice.status},
            )
        await self._meter_plan(session, outcome, choice.plan_id)

    @activity.defn(name="apply_stripe_subscription")
    async def apply_subscription(self, apply: StripeApply) -> StripeEventOutcome:
        """`customer.subscription.*`, `customer.deleted` and subscription-mode checkouts."""
        config = self.runtime.config
        event = apply.event
        customer_deleted = event.type == "customer.deleted"
        deleted = event.type == "customer.subscription.deleted"
        sub: Obj = apply.subscription or ({} if customer_deleted else event.object)
        customer = (se.ref_id(event.object.get("id")) if customer_deleted
                    else se.ref_id(sub.get("customer")) or se.ref_id(event.object.get("customer")))

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if not await self._resolve_org(session, outcome, customer):
                return None
            org_id = outcome.org_id
            assert org_id is not None
            marker, stale = await self._stale(session, outcome, se.SUBSCRIPTION_FAMILY)
            if stale:
                return None
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
            previous = await self.subscriptions.get(org_id, session) or {}
            if se.ends_another_subscription(previous.get("stripe_subscription_id"), sub,
                                            deleted=deleted) and not customer_deleted:
                # An upgrade by a new subscription cancels the old one: its end must not move
                # the organization off the plan it now pays for.
                return outcome.set("ignored", f"subscription {sub.get('id')} ended, but the "
                                   f"current one is {previous['stripe_subscription_id']}")
            if customer_deleted:
                choice = se.PlanChoice(config.default_plan.id, "canceled")
                fields: Obj = {"status": "canceled", "stripe_customer_id": None,
                               "stripe_subscription_id": None, "past_due_since": None}
            else:
                choice = se.plan_for_subscription(config, sub, deleted=deleted)
                fields = {"status": choice.status, "stripe_customer_id": customer,
                          "stripe_subscription_id": se.ref_id(sub.get("id")),
                          "current_period_start": se.period_start(sub)}
                if choice.status == "past_due":
                    fields["past_due_since"] = (previous.get("past_due_since")
                                                or se.timestamp(event.created))
                elif choice.status not in se.DELINQUENT_STATUSES:
                    fields["past_due_since"] = None
            await self.subscriptions.update_in(session, org_id, family=se.SUBSCRIPTION_FAMILY,
                                               marker=marker, fields=fields, now=apply.now)
            outcome.written.append(f"subscription status {choice.status}")
            await self._apply_plan(session, outcome, choice)
            if deleted:
                await self.meters.reset_week_usage_in(session, org_id, utcnow())
                outcome.written.append("week usage reset")
            if choice.status == "canceled" and previous.get("status") != "canceled":
                await self._notify(session, outcome, "subscription.expired",
                                   f"subscription.expired:{event.id}",
                                   {"subscription": fields.get("stripe_subscription_id"),
                                    "event": event.type})
            return None

        return await self._run(apply, work)

    @activity.defn(name="apply_stripe_invoice")
    async def apply_invoice(self, apply: StripeApply) -> StripeEventOutcome:
        """`invoice.payment_failed` -> past due (first failure date kept); a paid invoice
        clears it and re-reads the plan from the subscription the workflow fetched."""
        event = apply.event
        invoice = event.object
        failed = event.type == se.INVOICE_FAILED
        customer = se.ref_id(invoice.get("customer"))
        subscription_id = se.invoice_subscription(invoice)

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if not await self._resolve_org(session, outcome, customer):
                return None
            org_id = outcome.org_id
            assert org_id is not None
            marker, stale = await self._stale(session, outcome, se.INVOICE_FAMILY)
            if stale:
                return None
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
            previous = await self.subscriptions.get(org_id, session) or {}
            current = previous.get("stripe_subscription_id")
            if current and subscription_id and subscription_id != current:
                return outcome.set("ignored", f"invoice of subscription {subscription_id}, but "
                                   f"the current one is {current}")
            fields: Obj = {}
            if customer and not previous.get("stripe_customer_id"):
                fields["stripe_customer_id"] = customer
            if subscription_id and not previous.get("stripe_subscription_id"):
                fields["stripe_subscription_id"] = subscription_id
            if failed:
                since = previous.get("past_due_since") or se.timestamp(event.created)
                fields.update(status="past_due", past_due_since=since)
                outcome.written.append("subscription status past_due")
            elif previous.get("status") in se.DELINQUENT_STATUSES:
                fields.update(status="active", past_due_since=None)
                outcome.written.append("subscription status active")
            await self.subscriptions.update_in(session, org_id, family=se.INVOICE_FAMILY,
                                               marker=marker, fields=fields, now=apply.now)
            if failed:
                await self._notify(
                    session, outcome, "payment.failed", f"payment.failed:{event.id}",
                    {"invoice": invoice.get("id"), "amount_due": invoice.get("amount_due"),
                     "attempt_count": invoice.get("attempt_count")},
                )
            if "status" in fields and apply.subscription is not None:
                await self._apply_plan(session, outcome, se.plan_for_subscription(
                    self.runtime.config, apply.subscription))
            elif "status" in fields:
                await self._meter_plan(session, outcome, None)
            return None

        return await self._run(apply, work)
