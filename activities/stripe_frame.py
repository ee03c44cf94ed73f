"""What every Stripe apply activity shares (SPEC §5.5, §6): each activity is ONE MongoDB
transaction holding the event's whole effect (the ledger change, the subscription state and its
ordering marker, the notifications) and the `stripe_events` record of its outcome. A crash at any
point leaves either all of it or none of it, and a retried activity finds the record and writes
nothing twice.

The family modules (`stripe_purchases`, `stripe_refunds`, `stripe_disputes`,
`stripe_subscriptions`, `stripe_invoices`) only read, call a decision of `billing.stripe`, and
write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import final_on_bad_input
from billing.checkout import checkout_named
from billing.clock import utcnow
from billing.metrics import STRIPE_EVENTS
from billing.models import OrgRef, StripeApply, StripeEventOutcome, StripeOutcomeKind, StripeStep
from billing.runtime import Runtime
from billing.store import events
from billing.store.books import LedgerResult, notify
from billing.store.database import Doc
from billing.store.transactions import run_in_transaction
from billing.stripe import orgs
from billing.stripe.events import (
    CHARGE_REFUNDED,
    CUSTOMER_DELETED,
    PAYMENT_INTENT_SUCCEEDED,
    SUBSCRIPTION_TYPES,
)
from billing.stripe.invoices import invoice_subscription_metadata
from billing.stripe.objects import ref_id
from billing.stripe.purchases import Verdict, purchase_behind_charge

Obj = dict[str, Any]


class NotYet(Exception):
    """Raised inside the transaction when the event cannot be applied yet: the transaction is
    dropped (nothing written, nothing recorded) and the workflow is told what to get first."""

    def __init__(self, step: StripeStep) -> None:
        super().__init__(step.waiting_for or "needs the purchase")
        self.step = step


class UnknownCheckout(Exception):
    """The event names a checkout record the engine does not have: nothing is written and the
    event is recorded `unresolved` (SPEC §5.9)."""


class Outcome:
    """The outcome being built inside a transaction: what was decided and what was written."""

    def __init__(self, apply: StripeApply) -> None:
        self.apply = apply
        self.kind: StripeOutcomeKind = "applied"
        self.org_id: str | None = apply.org_id
        self.reason: str | None = None
        self.written: list[str] = []
        #: The engine's checkout record the event names, once read (`StripeFrame._checkout`).
        self.checkout: Doc | None = None

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


Work = Callable[[AsyncClientSession, Outcome], Awaitable[None]]


class StripeFrame:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.subscriptions = runtime.subscriptions
        self.meters = runtime.meters

    async def _run(self, apply: StripeApply, work: Work) -> StripeStep:
        """Run `work` and record its outcome in one transaction; an event already recorded
        (a retried activity, or a redelivery after the workflow history is gone) is a no-op,
        unless it was recorded `unresolved`. The record is looked up only when inserting it
        finds one: the work of that first transaction is then aborted and decided again."""
        db = self.runtime.db

        run_id = activity.info().workflow_run_id

        async def txn(session: AsyncClientSession, *, first: bool) -> StripeEventOutcome:
            if not first:
                found = await events.recorded_by_in(db, session, apply.event.id)
                prior, recorded_by = found if found is not None else (None, None)
                if prior is not None and recorded_by == run_id:
                    # This run's own earlier attempt committed, then its answer was lost (a
                    # timeout, a killed worker): its outcome stands.
                    return prior
                # An `unresolved` event wrote nothing: running it again (`billing replay`, once
                # what it lacked has arrived) may resolve it.
                if prior is not None and prior.outcome != "unresolved":
                    return prior.model_copy(update={
                        "outcome": "duplicate", "written": [],
                        "reason": f"event already recorded as {prior.outcome}",
                    })
            outcome = Outcome(apply)
            await work(session, outcome)
            result = outcome.result()
            await events.record_in(db, session, apply.event, result, apply.now, run_id,
                                   first=first)
            return result

        with final_on_bad_input():
            try:
                with malformed_object(apply):
                    try:
                        # Optimistic: the event is new, so its record is inserted, not looked
                        # up first; when it exists, nothing of this attempt was written.
                        result = await run_in_transaction(db.client, partial(txn, first=True))
                    except events.AlreadyRecorded:
                        result = await run_in_transaction(db.client, partial(txn, first=False))
            except NotYet as wait:
                return wait.step
            except UnknownCheckout as exc:
                return await self._run(apply.model_copy(update={
                    "outcome": "unresolved", "reason": str(exc)}), _record_decided)
        STRIPE_EVENTS.labels(result.type, result.outcome).inc()
        activity.logger.info(
            "stripe event %s: %s", result.outcome, result.reason or ", ".join(result.written),
            extra={"org_id": result.org_id, "event_id": result.event_id,
                   "event_type": result.type, "outcome": result.outcome},
        )
        return StripeStep(outcome=result)

    async def _notify(self, session: AsyncClientSession, outcome: Outcome, type: str, key: str,
                      payload: Obj) -> None:
        assert outcome.org_id is not None
        if await notify(self.runtime.db, session, org_id=outcome.org_id, type=type, key=key,
                        payload=payload, now=outcome.apply.now):
            outcome.written.append(f"notification {type}")

    async def _checkout(self, session: AsyncClientSession, outcome: Outcome,
                        objects: Sequence[Obj | None] = ()) -> Doc | None:
        """The engine's checkout record that the event's object or `objects` name (SPEC §5.9),
        kept on the outcome; `UnknownCheckout` when they name one the engine does not have."""
        if outcome.checkout is not None:
            return outcome.checkout
        event_object = outcome.apply.event.object
        named = checkout_named(*objects, event_object,
                               invoice_subscription_metadata(event_object))
        if named is None:
            return None
        outcome.checkout = await self.runtime.checkouts.get(named, session)
        if outcome.checkout is None:
            raise UnknownCheckout(f"the payment names checkout {named!r}, which is not a "
                                  "checkout the engine made")
        return outcome.checkout

    async def _find_org(self, session: AsyncClientSession, outcome: Outcome,
                        customers: Sequence[str | None] = (), *,
                        objects: Sequence[Obj | None] = (), intent: Obj | None = None,
                        subscription_org: str | None = None) -> str | None:
        """Set `outcome.org_id` in the order of SPEC §5.5 (`billing.stripe.orgs.resolve_org`):
        the engine's checkout record, what the payload named (already in `org_id`), the metadata
        of `objects`, of the payment intent, the known subscription's organization, and last the
        organization linked to the first of `customers` that has one (read only when nothing
        before names one)."""
        record = await self._checkout(session, outcome, (*objects, intent))
        recorded = record["org_id"] if record else None
        linked = None
        if orgs.needs_customer_link(recorded=recorded, named=outcome.org_id, objects=objects,
                                    payment_intent=intent, subscription_org=subscription_org):
            for customer in dict.fromkeys(c for c in customers if c):
                linked = await self.subscriptions.org_for_customer(customer, session)
                if linked is not None:
                    break
        outcome.org_id = orgs.resolve_org(
            recorded=recorded, named=outcome.org_id, objects=objects, payment_intent=intent,
            subscription_org=subscription_org, customer_org=linked)
        return outcome.org_id

    async def _resolve_org(self, session: AsyncClientSession, outcome: Outcome,
                           customer: str | None, *, objects: Sequence[Obj | None] = (),
                           intent: Obj | None = None,
                           subscription_org: str | None = None) -> bool:
        """`_find_org`; without an organization the outcome is `unresolved`."""
        if await self._find_org(session, outcome, (customer,), objects=objects, intent=intent,
                                subscription_org=subscription_org) is None:
            outcome.set("unresolved", f"no organization in metadata or linked to {customer}")
            return False
        return True

    async def _meter_plan(self, session: AsyncClientSession, outcome: Outcome,
                          plan_id: str, seats: int = 1) -> None:
        """Put the organization on `plan_id` and meter the rest of the week on what its status
        now pays for (call after writing the standing)."""
        assert outcome.org_id is not None
        account = await self.runtime.db.accounts.find_one({"_id": outcome.org_id},
                                                          {"plan_id": 1}, session=session)
        current = (account or {}).get("plan_id")
        # The week is the one this write lands in (a retry may land after the weekly reset),
        # not the one the workflow started in.
        changed = await self.meters.apply_plan_change_in(session, outcome.org_id, plan_id,
                                                         utcnow(), seats=seats)
        if changed or current != plan_id:
            outcome.written.append(f"plan {current} -> {plan_id}")

    async def _purchase_lots(self, session: AsyncClientSession, outcome: Outcome,
                             *, charge: str | None, what: str) -> list[Doc]:
        """The lots bought with the charge behind a refund or a dispute. When there are none
        yet, decide from the purchase Stripe holds (`billing.stripe.purchases`): a pack bought
        and not credited yet is waited for (`NotYet`); a payment that bought no pack is
        `ignored`, one whose purchase cannot be told is `unresolved` (both: empty list, the
        outcome set)."""
        apply = outcome.apply
        payment_intent = apply.payment_intent or ref_id(apply.event.object.get("payment_intent"))
        lots = await self.runtime.ledger.find_purchase_lots(
            payment_intent=payment_intent, charge=charge, session=session)
        if lots:
            outcome.org_id = lots[0]["org_id"]
            return lots
        facts = apply.purchase
        if facts is None:
            raise NotYet(StripeStep(needs_purchase=True))
        purchase = purchase_behind_charge(
            self.runtime.config, payment_intent=facts.payment_intent, session=facts.session,
            line_items=facts.line_items, intent=facts.intent, charge=facts.charge)
        if purchase.verdict is Verdict.CREDIT:
            raise NotYet(StripeStep(
                waiting_for=f"the purchase {payment_intent or charge} to be credited"))
        outcome.set("ignored" if purchase.verdict is Verdict.IGNORED else "unresolved",
                    f"{what}: {purchase.reason}")
        return []

    async def _charge_org(self, session: AsyncClientSession, outcome: Outcome, *,
                          known_only: bool = False) -> str | None:
        """The organization of a refunded or disputed charge whose purchase opened no lot (a
        plan payment, or one that cannot be told), in the order of SPEC §5.5: the event's
        metadata, the charge's and the Checkout session's, the payment intent's, then the
        customer's link. Its account exists afterwards; with `known_only`, None (and
        `outcome.org_id` unset) for an organization the engine has no account of: a payment that
        bought nothing of billing does not make an organization known (SPEC §5.1)."""
        apply = outcome.apply
        facts = apply.purchase
        obj = apply.event.object
        intent = facts.intent if facts else None
        charge = facts.charge if facts else None
        session_obj = facts.session if facts else None
        customers = [ref_id(o.get("customer")) for o in (obj, charge, intent, session_obj) if o]
        org_id = await self._find_org(session, outcome, customers,
                                      objects=(obj, charge, session_obj), intent=intent)
        if org_id is None:
            return None
        if not known_only:
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
        elif await self.runtime.db.accounts.find_one({"_id": org_id}, {"_id": 1},
                                                     session=session) is None:
            outcome.org_id = None
            return None
        return org_id

    @activity.defn(name="stripe_resolve_org")
    async def resolve_org(self, apply: StripeApply) -> OrgRef:
        """The organization of an event whose payload names none, read before anything else can
        fail (so a failure is findable by organization), from what the engine already holds, in
        the order of `billing.stripe.orgs.resolve_org`: the lots bought with the payment intent
        or charge, the checkout record the object names, the subscription's state, then the
        customer link. Only a first guess for the
        run's `OrgId`: the apply activity decides, with what Stripe holds about the payment
        (whose metadata a customer link never overrides)."""
        event = apply.event
        obj = event.object
        own_id = ref_id(obj.get("id"))
        intent = own_id if event.type == PAYMENT_INTENT_SUCCEEDED else ref_id(
            obj.get("payment_intent"))
        charge = own_id if event.type == CHARGE_REFUNDED else ref_id(obj.get("charge"))
        lots = await self.runtime.ledger.find_purchase_lots(payment_intent=intent, charge=charge)
        recorded = lots[0]["org_id"] if lots else None
        named = checkout_named(obj, invoice_subscription_metadata(obj))
        if recorded is None and named is not None:
            record = await self.runtime.checkouts.get(named)
            recorded = record["org_id"] if record else None
        sub_id = own_id if event.type in SUBSCRIPTION_TYPES else ref_id(obj.get("subscription"))
        doc = await self.subscriptions.subscription(sub_id) if sub_id and not recorded else None
        subscription_org = (doc or {}).get("org_id")
        customer = own_id if event.type == CUSTOMER_DELETED else ref_id(obj.get("customer"))
        linked = await self.subscriptions.org_for_customer(customer) if orgs.needs_customer_link(
            recorded=recorded, subscription_org=subscription_org) else None
        return OrgRef(org_id=orgs.resolve_org(recorded=recorded, subscription_org=subscription_org,
                                              customer_org=linked))

    @activity.defn(name="record_stripe_outcome")
    async def record_outcome(self, apply: StripeApply) -> StripeStep:
        """Record an outcome the workflow decided without a change (ignored, unresolved)."""
        return await self._run(apply, _record_decided)


async def _record_decided(session: AsyncClientSession, outcome: Outcome) -> None:
    """An outcome decided before the transaction (`apply.outcome`), with no change."""
    apply = outcome.apply
    outcome.set(apply.outcome or "ignored", apply.reason)
    # Nothing decided it: the run's first guess (`stripe_resolve_org`) is all there is.
    outcome.org_id = outcome.org_id or apply.org_guess


def purchase_of(lots: list[Doc]) -> Obj:
    """What a notification about a refund or a dispute says of the purchase behind its charge
    (`"purchase": null` when the charge bought no pack, SPEC §5.1)."""
    first = lots[0]
    return {"payment_intent": first.get("payment_intent"), "charge": first.get("charge"),
            "checkout_session": first.get("checkout_session"),
            "packs": [lot.get("pack_id") for lot in lots]}


@contextmanager
def malformed_object(apply: StripeApply) -> Iterator[None]:
    """A Stripe object without a field its type always has, or with a number beyond the 64 bits
    MongoDB stores: no retry can fix it, so the workflow fails at once."""
    try:
        yield
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ApplicationError(f"malformed {apply.event.type} object: {exc!r}",
                               type="MALFORMED_STRIPE_OBJECT", non_retryable=True) from exc


def bought_at(apply: StripeApply) -> datetime:
    """When the event happened (its `created`): what a lot's expiry counts from."""
    return datetime.fromtimestamp(apply.event.created, UTC)
