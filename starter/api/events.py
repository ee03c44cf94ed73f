"""`GET /v1/stripe-events/{evt id}` and `GET /v1/orgs/{org}/subscription` (SPEC §7)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel
from temporalio.service import RPCError, RPCStatusCode

from billing.errors import NotFound
from billing.models import StripeOutcomeKind
from billing.store import events
from billing.stripe.subscriptions import STATUS_NONE
from starter.api.deps import StateDep, temporal_client, v1_router
from starter.api.errors import ErrorResponse
from starter.temporal_client import TemporalUnavailable
from workflows.search import ORG_ID
from workflows.stripe_event import stripe_workflow_id

router = v1_router(
    tags=["stripe"],
    responses={401: {"model": ErrorResponse, "description": "missing or invalid bearer token"}},
)

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}


class StripeEventView(BaseModel):
    event_id: str
    workflow_id: str
    status: str | None
    outcome: StripeOutcomeKind | None
    org_id: str | None


class SubscriptionView(BaseModel):
    org_id: str
    plan_id: str
    status: str
    current_period_start: datetime | None
    past_due_since: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None


@router.get("/stripe-events/{event_id}", response_model=StripeEventView, responses=NOT_FOUND)
async def stripe_event(
    event_id: Annotated[str, Path(min_length=1, max_length=255)], state: StateDep
) -> StripeEventView:
    """The Temporal status of the event's workflow and the outcome recorded in MongoDB.

    A closed run past Temporal's retention is gone from Temporal while its record stays: the
    status is then `COMPLETED`, since a record is only written by a completed change.
    """
    workflow_id = stripe_workflow_id(event_id)
    record = await events.get(state.runtime.db, event_id)
    status: str | None = None
    org_id = record.get("org_id") if record else None
    try:
        client = await temporal_client(state)
        description = await client.get_workflow_handle(workflow_id).describe()
        status = description.status.name if description.status else None
        org_id = org_id or description.typed_search_attributes.get(ORG_ID)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise TemporalUnavailable(f"cannot describe {workflow_id}: {exc}") from exc
    except TemporalUnavailable:
        if record is None:
            raise
    if record is None and status is None:
        raise NotFound(f"the engine never saw Stripe event {event_id!r}")
    return StripeEventView(
        event_id=event_id,
        workflow_id=workflow_id,
        status=status or "COMPLETED",
        outcome=record["outcome"] if record else None,
        org_id=org_id,
    )


@router.get("/orgs/{org}/subscription", response_model=SubscriptionView, responses=NOT_FOUND)
async def subscription(org: str, state: StateDep) -> SubscriptionView:
    runtime = state.runtime
    account = await runtime.accounts.get(org)
    doc = await runtime.subscriptions.get(org) or {}
    return SubscriptionView(
        org_id=org,
        plan_id=runtime.config.plan(account.get("plan_id")).id,
        status=doc.get("status") or STATUS_NONE,
        current_period_start=doc.get("current_period_start"),
        past_due_since=doc.get("past_due_since"),
        stripe_customer_id=doc.get("stripe_customer_id"),
        stripe_subscription_id=doc.get("stripe_subscription_id"),
    )
