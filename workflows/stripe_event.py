"""`StripeEventWorkflow` (id `stripe-<evt id>`): one verified Stripe event, applied once.

The workflow only decides: which Stripe reads the payload needs (a subscription's real status, a
payment intent's metadata, line items, the refunds of a charge) and which apply activity writes
the effect. Each apply activity is one MongoDB transaction that also records the outcome.
A run started with a `StripeReplay` (`billing replay`) first retrieves its event from Stripe.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

from billing.models import (
    StripeApply,
    StripeEvent,
    StripeEventOutcome,
    StripeReplay,
    SubscriptionState,
)
from workflows.common import FAIL_ON, call
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE

with workflow.unsafe.imports_passed_through():
    from billing import stripe_events as se

Obj = dict[str, Any]


def stripe_workflow_id(event_id: str) -> str:
    return f"stripe-{event_id}"


async def _outcome(activity: str, apply: StripeApply) -> StripeEventOutcome:
    return await call(activity, apply, StripeEventOutcome)


async def _record(apply: StripeApply, outcome: str, reason: str) -> StripeEventOutcome:
    return await _outcome("record_stripe_outcome",
                          apply.model_copy(update={"outcome": outcome, "reason": reason}))


async def _read(activity: str, stripe_id: str) -> Obj:
    """One Stripe API read (activities/stripe_api.py)."""
    found: Obj = await call(activity, stripe_id, dict)
    return found


async def _list(activity: str, stripe_id: str) -> list[Obj]:
    found: list[Obj] = await call(activity, stripe_id, list)
    return found


def _expanded(value: object) -> Obj | None:
    return value if isinstance(value, dict) else None


@workflow.defn(failure_exception_types=FAIL_ON)
class StripeEventWorkflow:
    @workflow.run
    async def run(self, event: StripeEvent | StripeReplay) -> StripeEventOutcome:
        if isinstance(event, StripeReplay):
            event = await call("stripe_retrieve_event", event.event_id, StripeEvent)
        obj = event.object
        org = se.org_from(obj, se.invoice_subscription_metadata(obj))
        attributes = [STRIPE_EVENT_TYPE.value_set(event.type)]
        if org is not None:
            attributes.append(ORG_ID.value_set(org))
        workflow.upsert_search_attributes(attributes)
        result = await self._handle(StripeApply(event=event, now=workflow.now(), org_id=org))
        if result.org_id is not None and result.org_id != org:
            workflow.upsert_search_attributes([ORG_ID.value_set(result.org_id)])
        return result

    async def _handle(self, apply: StripeApply) -> StripeEventOutcome:
        kind = apply.event.type
        obj = apply.event.object
        if kind == "checkout.session.completed":
            return await self._checkout(apply)
        if kind == "payment_intent.succeeded":
            return await _outcome("apply_stripe_purchase",
                                  apply.model_copy(update={"pack_id": se.pack_from(obj)}))
        if kind in se.SUBSCRIPTION_TYPES:
            return await _outcome("apply_stripe_subscription", apply)
        if kind == se.INVOICE_FAILED:
            return await _outcome("apply_stripe_invoice", apply)
        if kind in se.INVOICE_PAID_TYPES:
            return await self._invoice_paid(apply)
        if kind in se.REFUND_TYPES:
            refunds = [obj] if kind == "refund.created" else se.charge_refunds(obj)
            if refunds is None:
                refunds = await _list("stripe_list_refunds", str(obj["id"]))
            return await _outcome("apply_stripe_refunds",
                                  apply.model_copy(update={"refunds": refunds}))
        if kind in se.DISPUTE_TYPES:
            return await self._dispute(apply)
        return await _record(apply, "ignored", f"event type {kind} is not handled")

    async def _checkout(self, apply: StripeApply) -> StripeEventOutcome:
        session = apply.event.object
        mode = session.get("mode")
        if mode == "subscription":
            # Never assume `active`: read the subscription's real status from Stripe.
            subscription_id = se.ref_id(session.get("subscription"))
            if subscription_id is None:
                return await _record(apply, "unresolved",
                                     "subscription checkout names no subscription")
            sub = await _read("stripe_retrieve_subscription", subscription_id)
            return await _outcome("apply_stripe_subscription", apply.model_copy(
                update={"subscription": sub, "org_id": apply.org_id or se.org_from(sub)}))
        if mode != "payment":
            return await _record(apply, "ignored", f"checkout mode {mode} buys nothing")
        if session.get("payment_status") != "paid":
            return await _record(apply, "ignored",
                                 f"checkout payment status is {session.get('payment_status')}")
        org, pack = apply.org_id, se.pack_from(session)
        payment_intent = se.ref_id(session.get("payment_intent"))
        if (org is None or pack is None) and payment_intent is not None:
            intent = _expanded(session.get("payment_intent")) or await _read(
                "stripe_retrieve_payment_intent", payment_intent)
            org, pack = org or se.org_from(intent), pack or se.pack_from(intent)
        line_items: list[Obj] | None = None
        if pack is None:
            line_items = await _list("stripe_list_line_items", str(session["id"]))
        return await _outcome("apply_stripe_purchase", apply.model_copy(
            update={"org_id": org, "pack_id": pack, "line_items": line_items}))

    async def _invoice_paid(self, apply: StripeApply) -> StripeEventOutcome:
        state = await call("stripe_subscription_state", apply, SubscriptionState)
        subscription_id = se.invoice_subscription(apply.event.object)
        sub: Obj | None = None
        if state.status in se.DELINQUENT_STATUSES and subscription_id is not None:
            sub = await _read("stripe_retrieve_subscription", subscription_id)
        return await _outcome("apply_stripe_invoice", apply.model_copy(
            update={"org_id": apply.org_id or state.org_id, "subscription": sub}))

    async def _dispute(self, apply: StripeApply) -> StripeEventOutcome:
        """A dispute names its charge; the purchase lot is found by payment intent, so read the
        charge when the payload does not name one."""
        dispute = apply.event.object
        charge_id = se.ref_id(dispute.get("charge"))
        if se.ref_id(dispute.get("payment_intent")) is None and charge_id is not None:
            charge = _expanded(dispute.get("charge"))
            if charge is None:
                charge = await _read("stripe_retrieve_charge", charge_id)
            apply = apply.model_copy(update={
                "payment_intent": se.ref_id(charge.get("payment_intent")),
                "org_id": apply.org_id or se.org_from(charge),
            })
        return await _outcome("apply_stripe_dispute", apply)
