"""`StripeEventWorkflow` (id `stripe-<evt id>`): one verified Stripe event, applied once.

The workflow only decides which Stripe reads an event needs (a subscription's real status, the
refunds of a charge, the purchase behind a refunded charge) and which apply activity writes the
effect; `ROUTES` maps every handled event type to its handler. Each apply activity is one MongoDB
transaction that also records the outcome. A purchase is one activity: it reads the Checkout
session behind the payment and its line items itself, just before its transaction. Since
`LOCAL_STEPS` every step runs as a local activity, so the commonest event is a single workflow
task.

A refund or dispute of a purchase that is not credited yet (Stripe does not order deliveries)
waits for it durably, polling with backoff for up to 72 hours after the event (Stripe's own
redelivery window), then fails visibly. A run started with a `StripeReplay` (`billing replay`)
first retrieves its event from Stripe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from billing.models import (
    PurchaseFacts,
    PurchaseQuery,
    StripeApply,
    StripeEvent,
    StripeEventOutcome,
    StripeReplay,
    StripeStep,
)
from workflows import steps
from workflows.common import ACTIVITY_TIMEOUT, FAIL_ON, STRIPE_TIMEOUT, A, Step, T, call
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE

with workflow.unsafe.imports_passed_through():
    from billing.stripe import REQUEST_TIMEOUT
    from billing.stripe import events as ev
    from billing.stripe.invoices import invoice_subscription, invoice_subscription_metadata
    from billing.stripe.objects import expanded, org_from, ref_id
    from billing.stripe.purchases import PAID_STATUSES
    from billing.stripe.refunds import charge_refunds
    from billing.stripe.subscriptions import DELINQUENT_STATUSES

Obj = dict[str, Any]
#: An apply activity's stub: the event in, the step (an outcome, or what it needs first) out.
Apply = Step[StripeApply, StripeStep]

#: How long a refund or dispute waits for its purchase to be credited, from the event's
#: `created`: Stripe retries a delivery for up to 3 days.
PURCHASE_WAIT = timedelta(hours=72)
FIRST_POLL = timedelta(seconds=2)
LONGEST_POLL = timedelta(minutes=15)


#: The release whose steps (Stripe reads and apply transactions) are local activities: a
#: purchase is one workflow task instead of two plus an activity task, about 9 ms less of the
#: Temporal server's CPU and half the latency per event (BENCHMARKS.md, webhook). Each step takes
#: milliseconds, each attempt is bounded by its timeout, and a step is idempotent on the event id,
#: which a local activity needs (a worker lost mid-task runs the step again). Deprecated: no run
#: of the releases before it can still be open (a run lives at most `PURCHASE_WAIT`), so every
#: run takes its branch; the call stays until no run recorded with its marker can be open either
#: (README, "Versioning workflows").
LOCAL_STEPS = "local-steps"


#: Up to three Stripe reads (each bounded by the client's request timeout), then the transaction.
PURCHASE_TIMEOUT = 3 * REQUEST_TIMEOUT + ACTIVITY_TIMEOUT


def stripe_workflow_id(event_id: str) -> str:
    return f"stripe-{event_id}"


def _mark(event_type: str, org: str | None) -> None:
    """Set the search attributes the run does not carry yet (the webhook sets them at start)."""
    current = workflow.info().typed_search_attributes
    updates = []
    if current.get(STRIPE_EVENT_TYPE) != event_type:
        updates.append(STRIPE_EVENT_TYPE.value_set(event_type))
    if org is not None and current.get(ORG_ID) != org:
        updates.append(ORG_ID.value_set(org))
    if updates:
        workflow.upsert_search_attributes(updates)


def _missing(exc: ActivityError | ApplicationError) -> bool:
    """Stripe does not know the object: the step's error arrives inside an `ActivityError` from
    a regular activity, as it is from a local one."""
    cause = exc.cause if isinstance(exc, ActivityError) else exc
    return isinstance(cause, ApplicationError) and cause.type == "STRIPE_404"


@workflow.defn(failure_exception_types=FAIL_ON)
class StripeEventWorkflow:
    def __init__(self) -> None:
        self._waiting_for: str | None = None

    # ---- steps -------------------------------------------------------------------------------

    async def _call(self, activity: Step[A, T], arg: A, *,
                    start_to_close: timedelta = ACTIVITY_TIMEOUT) -> T:
        """One step, a local activity (`LOCAL_STEPS`)."""
        return await call(activity, arg, start_to_close=start_to_close, local=True)

    async def _outcome(self, activity: Apply, apply: StripeApply, *,
                       start_to_close: timedelta = ACTIVITY_TIMEOUT) -> StripeEventOutcome:
        step = await self._call(activity, apply, start_to_close=start_to_close)
        if step.outcome is None:
            raise ApplicationError(f"{activity.__name__} asked for more than this event gives",
                                   type="UNEXPECTED_STEP", non_retryable=True)
        return step.outcome

    async def _record(self, apply: StripeApply, outcome: str, reason: str) -> StripeEventOutcome:
        return await self._outcome(steps.record_stripe_outcome,
                                   apply.model_copy(update={"outcome": outcome, "reason": reason}))

    async def _read(self, activity: Step[str, Obj], stripe_id: str) -> Obj:
        """One Stripe API read (activities/stripe_api.py)."""
        return await self._call(activity, stripe_id, start_to_close=STRIPE_TIMEOUT)

    async def _read_unless_missing(self, activity: Step[str, Obj],
                                   stripe_id: str) -> Obj | None:
        """One Stripe API read; None when Stripe does not know the object (404)."""
        try:
            return await self._read(activity, stripe_id)
        except (ActivityError, ApplicationError) as exc:
            if _missing(exc):
                return None
            raise

    async def _list(self, activity: Step[str, list[Obj]], stripe_id: str) -> list[Obj]:
        return await self._call(activity, stripe_id, start_to_close=STRIPE_TIMEOUT)

    @workflow.query
    def waiting_for(self) -> str | None:
        """What the run is waiting for (a purchase to be credited), None when it is not."""
        return self._waiting_for

    @workflow.run
    async def run(self, event: StripeEvent | StripeReplay) -> StripeEventOutcome:
        workflow.deprecate_patch(LOCAL_STEPS)
        if isinstance(event, StripeReplay):
            event = await self._call(steps.stripe_retrieve_event, event.event_id,
                                     start_to_close=STRIPE_TIMEOUT)
        obj = event.object
        org = org_from(obj, invoice_subscription_metadata(obj))
        apply = StripeApply(event=event, now=workflow.now(), org_id=org)
        _mark(event.type, org)
        if org is None and event.type not in ev.INVOICE_TYPES:
            # Findable by organization before anything else can fail (SPEC §6). Only a guess (a
            # customer link may be all it has): the apply activity decides, and metadata that
            # Stripe's objects hold comes before any link (SPEC §5.5).
            found = await self._call(steps.stripe_resolve_org, apply)
            if found.org_id is not None:
                apply = apply.model_copy(update={"org_guess": found.org_id})
                _mark(event.type, found.org_id)
        handler = ROUTES.get(event.type)
        if handler is None:
            result = await self._record(apply, "ignored", f"event type {event.type} is not handled")
        else:
            result = await handler(self, apply)
        if result.org_id is not None and result.org_id != (apply.org_id or apply.org_guess):
            workflow.upsert_search_attributes([ORG_ID.value_set(result.org_id)])
        return result

    # ---- purchases ---------------------------------------------------------------------------

    async def _checkout(self, apply: StripeApply) -> StripeEventOutcome:
        session = apply.event.object
        mode = session.get("mode")
        if mode == "subscription":
            return await self._subscription_checkout(apply)
        if mode != "payment":
            return await self._record(apply, "ignored", f"checkout mode {mode} buys nothing")
        if apply.event.type == ev.CHECKOUT_ASYNC_FAILED:
            return await self._outcome(steps.apply_stripe_purchase_failed, apply)
        status = session.get("payment_status")
        if status not in PAID_STATUSES:
            return await self._record(apply, "ignored", f"checkout payment status is {status}: "
                                 "a delayed payment method credits when it succeeds")
        return await self._purchase(apply)

    async def _purchase(self, apply: StripeApply) -> StripeEventOutcome:
        """One activity reads the purchase from Stripe and credits it."""
        return await self._outcome(steps.read_and_apply_stripe_purchase, apply,
                                   start_to_close=PURCHASE_TIMEOUT)

    # ---- subscriptions and invoices ----------------------------------------------------------

    async def _subscription_checkout(self, apply: StripeApply) -> StripeEventOutcome:
        """Never assume `active`: read the subscription's real status from Stripe."""
        subscription_id = ref_id(apply.event.object.get("subscription"))
        if subscription_id is None:
            return await self._record(apply, "unresolved",
                                 "subscription checkout names no subscription")
        sub = await self._read(steps.stripe_retrieve_subscription, subscription_id)
        return await self._outcome(steps.apply_stripe_subscription, apply.model_copy(
            update={"subscription": sub, "org_id": apply.org_id or org_from(sub)}))

    async def _subscription(self, apply: StripeApply) -> StripeEventOutcome:
        return await self._outcome(steps.apply_stripe_subscription, apply)

    async def _invoice(self, apply: StripeApply) -> StripeEventOutcome:
        """Read the invoice's subscription from Stripe when the engine does not know it yet (its
        own events are late: it may name the organization, and says whether it is live), or when
        a payment recovers it (its plan may have changed meanwhile)."""
        state = await self._call(steps.stripe_subscription_state, apply)
        if apply.org_id is None:
            _mark(apply.event.type, state.org_id)
        subscription_id = invoice_subscription(apply.event.object)
        recovers = (apply.event.type in ev.INVOICE_PAID_TYPES
                    and state.status in DELINQUENT_STATUSES)
        sub: Obj | None = None
        if subscription_id is not None and (state.status is None or recovers):
            sub = await self._read_unless_missing(steps.stripe_retrieve_subscription,
                                                  subscription_id)
        # The subscription's metadata comes before what the engine knows (`state.org_id` may be
        # only a customer link): `apply_stripe_invoice` decides in the order of SPEC §5.5.
        org = apply.org_id or (org_from(sub) if sub else None)
        return await self._outcome(steps.apply_stripe_invoice, apply.model_copy(
            update={"org_id": org, "subscription": sub}))

    # ---- refunds and disputes ----------------------------------------------------------------

    async def _refund(self, apply: StripeApply) -> StripeEventOutcome:
        obj = apply.event.object
        if apply.event.type == ev.CHARGE_REFUNDED:
            refunds = charge_refunds(obj)
            if refunds is None:
                refunds = await self._list(steps.stripe_list_refunds, str(obj["id"]))
        else:
            refunds = [obj]
        return await self._clawback(steps.apply_stripe_refunds,
                                    apply.model_copy(update={"refunds": refunds}))

    async def _dispute(self, apply: StripeApply) -> StripeEventOutcome:
        """A dispute names its charge; purchase lots are found by payment intent, so read the
        charge when the payload does not name one."""
        dispute = apply.event.object
        charge_id = ref_id(dispute.get("charge"))
        if ref_id(dispute.get("payment_intent")) is None and charge_id is not None:
            charge = expanded(dispute.get("charge")) or await self._read(
                steps.stripe_retrieve_charge, charge_id)
            apply = apply.model_copy(update={
                "payment_intent": ref_id(charge.get("payment_intent")),
                "org_id": apply.org_id or org_from(charge),
            })
        return await self._clawback(steps.apply_stripe_dispute, apply)

    async def _clawback(self, activity: Apply, apply: StripeApply) -> StripeEventOutcome:
        """Apply a refund or dispute; when its purchase is not credited yet, read what Stripe
        holds about it once, then wait for the credit (polling with backoff) until 72 hours after
        the event, and fail visibly past that."""
        deadline = datetime.fromtimestamp(apply.event.created, UTC) + PURCHASE_WAIT
        poll = FIRST_POLL
        while True:
            step = await self._call(activity, apply)
            if step.outcome is not None:
                return step.outcome
            if step.needs_purchase and apply.purchase is None:
                apply = apply.model_copy(update={"purchase": await self._purchase_behind(apply)})
                continue
            left = deadline - workflow.now()
            if left <= timedelta(0):
                raise ApplicationError(
                    f"{apply.event.type} {apply.event.id}: still waiting for "
                    f"{step.waiting_for} {PURCHASE_WAIT} after the event",
                    type="PURCHASE_NOT_CREDITED", non_retryable=True)
            self._waiting_for = step.waiting_for
            await workflow.sleep(min(poll, left))
            self._waiting_for = None
            poll = min(poll * 2, LONGEST_POLL)

    async def _purchase_behind(self, apply: StripeApply) -> PurchaseFacts:
        """The purchase behind a refunded or disputed charge; a payment intent Stripe does not
        know (404) leaves the purchase undetermined rather than failing the event."""
        obj = apply.event.object
        charge = obj if apply.event.type == ev.CHARGE_REFUNDED else None
        payment_intent = apply.payment_intent or ref_id(obj.get("payment_intent"))
        return await self._call(steps.stripe_purchase_facts,
                                PurchaseQuery(payment_intent=payment_intent, charge=charge),
                                start_to_close=3 * REQUEST_TIMEOUT)


Handler = Callable[[StripeEventWorkflow, StripeApply], Awaitable[StripeEventOutcome]]

#: Every handled event type and its handler (SPEC §5.5); any other type is recorded `ignored`.
ROUTES: dict[str, Handler] = {
    **dict.fromkeys(ev.CHECKOUT_TYPES, StripeEventWorkflow._checkout),
    ev.PAYMENT_INTENT_SUCCEEDED: StripeEventWorkflow._purchase,
    **dict.fromkeys(ev.SUBSCRIPTION_TYPES | {ev.CUSTOMER_DELETED},
                    StripeEventWorkflow._subscription),
    **dict.fromkeys(ev.INVOICE_TYPES, StripeEventWorkflow._invoice),
    **dict.fromkeys(ev.REFUND_TYPES, StripeEventWorkflow._refund),
    **dict.fromkeys(ev.DISPUTE_TYPES, StripeEventWorkflow._dispute),
}
assert set(ROUTES) == ev.HANDLED_TYPES
