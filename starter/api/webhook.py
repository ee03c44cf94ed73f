"""`POST /stripe/webhook`: verify, then hand the event to `StripeEventWorkflow` (SPEC §7).

The receiver writes nothing to MongoDB: the workflow id `stripe-<evt id>` is the first line of
deduplication and the ledger keys are the last. Any answer other than 2xx makes Stripe retry,
which is what a 503 for an unreachable Temporal is for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Literal

import stripe
from fastapi import APIRouter, Request
from pydantic import BaseModel
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from billing.errors import BillingError
from billing.metrics import STRIPE_OTHER_MODE, STRIPE_WEBHOOKS
from billing.models import StripeEvent
from billing.stripe.events import is_handled, other_mode
from billing.stripe.invoices import invoice_subscription_metadata
from billing.stripe.objects import org_from
from starter.api.deps import StateDep, temporal_client
from starter.api.errors import ErrorResponse
from starter.temporal_client import TemporalUnavailable
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE
from workflows.stripe_event import StripeEventWorkflow, stripe_workflow_id

TOLERANCE_S = 300
START_TIMEOUT_S = 15.0

router = APIRouter(tags=["stripe"])
log = logging.getLogger(__name__)


class WebhookNotConfigured(BillingError):
    status = 503
    code = "WEBHOOK_NOT_CONFIGURED"


class WebhookAck(BaseModel):
    status: Literal["started", "duplicate", "ignored"]
    workflow_id: str | None


def verify_signature(body: bytes, header: str | None, secrets: tuple[str, ...]) -> None:
    """Accept the body when any configured secret signed it within the tolerance (rotation)."""
    if not secrets:
        raise WebhookNotConfigured("STRIPE_WEBHOOK_SECRET is not set")
    if not header:
        raise BillingError("the Stripe-Signature header is missing", code="SIGNATURE_MISSING")
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BillingError("the body is not UTF-8", code="SIGNATURE_INVALID") from exc
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, None)
        except stripe.SignatureVerificationError:
            continue
        # Stripe's check refuses old timestamps only; a signature dated ahead is refused too.
        if abs(time.time() - _signed_at(header)) > TOLERANCE_S:
            raise BillingError(f"the signature is more than {TOLERANCE_S} s from now",
                               code="SIGNATURE_EXPIRED")
        return
    raise BillingError("no configured secret matches the signature", code="SIGNATURE_INVALID")


def _signed_at(header: str) -> int:
    """The `t=` timestamp of a header whose signature already verified (so it has one)."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    raise BillingError("the signature has no timestamp", code="SIGNATURE_INVALID")


def read_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BillingError("the body is not valid JSON", code="MALFORMED_JSON") from exc


def parse_event(data: Any) -> StripeEvent:
    shape_error = BillingError("an event needs an id of 1 to 255 letters, digits or `_.:-`, a "
                               "string type, an integer Unix time created and an object "
                               "data.object", code="MALFORMED_EVENT")
    try:
        return StripeEvent.from_stripe(data)
    except ValueError as exc:
        raise shape_error from exc


async def start_event_workflow(client: Client, event: StripeEvent, task_queue: str) -> bool:
    """Start `stripe-<evt id>`; False when that id already exists, running or closed."""
    pairs: list[SearchAttributePair[str]] = [SearchAttributePair(STRIPE_EVENT_TYPE, event.type)]
    org = org_from(event.object, invoice_subscription_metadata(event.object))
    if org is not None:
        pairs.append(SearchAttributePair(ORG_ID, org))
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            handle = await client.start_workflow(
                StripeEventWorkflow.run,
                event,
                id=stripe_workflow_id(event.id),
                task_queue=task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=TypedSearchAttributes(pairs),
            )
    except WorkflowAlreadyStartedError:
        return False  # closed run with this id: REJECT_DUPLICATE
    except (RPCError, TimeoutError) as exc:
        raise TemporalUnavailable(f"cannot start the workflow: {exc}") from exc
    # With USE_EXISTING a running workflow is returned instead of an error; the server's start
    # response says whether this call created it (the SDK keeps it on the handle only).
    response = getattr(handle, "_start_workflow_response", None)
    return bool(getattr(response, "started", True))


@router.post(
    "/stripe/webhook",
    response_model=WebhookAck,
    responses={
        400: {"model": ErrorResponse, "description": "bad or stale signature, malformed JSON"},
        413: {"model": ErrorResponse, "description": "body above 1 MiB"},
        503: {"model": ErrorResponse, "description": "Temporal unreachable: Stripe retries"},
    },
)
async def stripe_webhook(request: Request, state: StateDep) -> WebhookAck:
    event_type = "-"
    try:
        body = await request.body()  # at most 1 MiB: starter.api.limits
        settings = state.runtime.settings
        verify_signature(body, request.headers.get("stripe-signature"), settings.webhook_secrets)
        data = read_json(body)
        event = parse_event(data)
        event_type = event.type
        livemode = data.get("livemode")  # an object: `parse_event` accepted it
        if other_mode(livemode, settings.stripe_api_key):
            # A test event on a live engine (a test-mode secret among the webhook secrets), or
            # the reverse: it never credits anything (SPEC §5.5).
            STRIPE_OTHER_MODE.labels(event.type, str(livemode).lower()).inc()
            log.warning("stripe webhook ignored: livemode %s differs from the API key's mode",
                        livemode, extra={"event_id": event.id, "event_type": event.type})
            ack = WebhookAck(status="ignored", workflow_id=None)
        elif not is_handled(event.type):
            ack = WebhookAck(status="ignored", workflow_id=None)
        else:
            client = await temporal_client(state)
            started = await start_event_workflow(client, event, settings.temporal_task_queue)
            ack = WebhookAck(status="started" if started else "duplicate",
                             workflow_id=stripe_workflow_id(event.id))
    except BillingError as exc:
        answer = "unavailable" if exc.status == 503 else "rejected"
        STRIPE_WEBHOOKS.labels(event_type, answer).inc()
        log.warning("stripe webhook %s: %s", answer, exc.code,
                    extra={"event_type": event_type, "code": exc.code})
        raise
    STRIPE_WEBHOOKS.labels(event.type, ack.status).inc()
    log.info("stripe webhook %s", ack.status, extra={
        "event_id": event.id, "event_type": event.type, "workflow_id": ack.workflow_id})
    return ack
