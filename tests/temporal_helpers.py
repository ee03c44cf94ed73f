"""Starting and inspecting the billing workflows from tests."""

from __future__ import annotations

import asyncio
from typing import Any

from stripe_payloads import (
    deliver,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from billing.models import StripeEventOutcome
from starter.operations.failures import list_failed


async def started(api: Any, evt: dict[str, Any], client: Client) -> WorkflowHandle[Any, Any]:
    response = await deliver(api, evt)
    assert response.json()["status"] == "started", response.text
    return client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)


async def activity_attempts(handle: WorkflowHandle[Any, Any]) -> dict[str, int]:
    """Activity type -> the attempt its last start was (Temporal records the last one only)."""
    names: dict[int, str] = {}
    attempts: dict[str, int] = {}
    async for item in handle.fetch_history_events():
        if item.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[item.event_id] = item.activity_task_scheduled_event_attributes.activity_type.name
        elif item.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started_event = item.activity_task_started_event_attributes
            attempts[names[started_event.scheduled_event_id]] = started_event.attempt
    return attempts


async def failed_ids(client: Client, org: str, task_queue: str) -> set[str]:
    """Visibility is eventually consistent: wait for the failure to be listed."""
    for _ in range(100):
        found = {f.workflow_id for f in await list_failed(client, org=org, task_queue=task_queue)}
        if found:
            return found
        await asyncio.sleep(0.2)
    return set()
