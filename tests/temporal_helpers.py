"""Starting and inspecting the billing workflows from tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from stripe_payloads import (
    deliver,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ActivityError, ApplicationError

from billing.models import StripeEventOutcome
from starter.operations.failures import list_failed


async def started(api: Any, evt: dict[str, Any], client: Client) -> WorkflowHandle[Any, Any]:
    response = await deliver(api, evt)
    assert response.json()["status"] == "started", response.text
    return client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)


async def outcome_of(api: Any, client: Client, evt: dict[str, Any]) -> StripeEventOutcome:
    """Deliver a signed event (a redelivery too) and wait for its run's outcome."""
    response = await deliver(api, evt)
    assert response.status_code == 200, response.text
    handle = client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)
    result: StripeEventOutcome = await handle.result()
    return result


#: The marker a local activity's result is recorded as (its details hold the attempt).
LOCAL_ACTIVITY_MARKER = "core_local_activity"


async def activity_attempts(handle: WorkflowHandle[Any, Any]) -> dict[str, int]:
    """Activity type -> the attempt its last start was (Temporal records the last one only),
    for regular activities and local ones alike."""
    names: dict[int, str] = {}
    attempts: dict[str, int] = {}
    async for item in handle.fetch_history_events():
        marker = item.marker_recorded_event_attributes
        if (item.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
                and marker.marker_name == LOCAL_ACTIVITY_MARKER):
            data = json.loads(marker.details["data"].payloads[0].data)
            attempts[data["activity_type"]] = data["attempt"]
        elif item.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[item.event_id] = item.activity_task_scheduled_event_attributes.activity_type.name
        elif item.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started_event = item.activity_task_started_event_attributes
            attempts[names[started_event.scheduled_event_id]] = started_event.attempt
    return attempts


def step_error(failure: BaseException | None) -> ApplicationError:
    """The error a failed step raised: inside an `ActivityError` from a regular activity, as it
    is from a local one (every step of a Stripe event)."""
    cause = failure.cause if isinstance(failure, ActivityError) else failure
    assert isinstance(cause, ApplicationError), repr(failure)
    return cause


async def failed_ids(client: Client, org: str, task_queue: str) -> set[str]:
    """Visibility is eventually consistent: wait for the failure to be listed."""
    for _ in range(100):
        found = {f.workflow_id for f in await list_failed(client, org=org, task_queue=task_queue)}
        if found:
            return found
        await asyncio.sleep(0.2)
    return set()
