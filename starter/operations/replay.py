"""`billing replay`: a new run of `stripe-<evt id>` that retrieves the event from Stripe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowFailureError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from billing.errors import BillingError, InvalidInput
from billing.models import StripeEventOutcome, StripeReplay
from starter.operations.failures import failure_message
from workflows.stripe_event import StripeEventWorkflow, stripe_workflow_id


class EventRunning(BillingError):
    status = 409
    code = "EVENT_RUNNING"




@dataclass(frozen=True)
class ReplayResult:
    workflow_id: str
    run_id: str
    outcome: StripeEventOutcome | None
    failure: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"workflow_id": self.workflow_id, "run_id": self.run_id, "failure": self.failure,
                "outcome": self.outcome.model_dump(mode="json") if self.outcome else None}


def replay_request(event_id: str) -> StripeReplay:
    try:
        return StripeReplay(event_id=event_id)
    except ValidationError as exc:
        raise InvalidInput(f"{event_id!r} is not a Stripe event id (evt_...)") from exc


async def replay_event(client: Client, event_id: str, *, task_queue: str) -> ReplayResult:
    """Run `stripe-<evt id>` again as a new run that retrieves the event from Stripe, and wait
    for its outcome. The outcome record and the ledger keys make it apply at most once: an
    event already applied comes back `duplicate` and writes nothing."""
    replay = replay_request(event_id)
    workflow_id = stripe_workflow_id(event_id)
    try:
        handle = await client.start_workflow(
            StripeEventWorkflow.run, replay, id=workflow_id, task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    except WorkflowAlreadyStartedError as exc:
        raise EventRunning(f"{workflow_id} is running: wait for it to finish") from exc
    run_id = handle.result_run_id or ""
    try:
        return ReplayResult(workflow_id, run_id, await handle.result())
    except WorkflowFailureError:
        return ReplayResult(workflow_id, run_id, None,
                            await failure_message(client, workflow_id, run_id))
