"""Finding and retrying failed billing workflows (SPEC §6): the failed run is the dead letter.

A failure is listed through Temporal visibility (`ExecutionStatus="Failed"`, optionally
`AND OrgId="..."`); a retry resets the run to its first workflow task, so the whole workflow runs
again under the same id. Every write is idempotent by key, so running again is safe.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus

from billing.errors import BillingError
from billing.store.accounts import check_org_id
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE

#: A workflow in one of these states can be retried; a running or completed one cannot.
RETRYABLE = frozenset(
    {
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.TIMED_OUT,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.CANCELED,
    }
)


class NotRetryable(BillingError):
    status = 409
    code = "NOT_RETRYABLE"


@dataclass(frozen=True)
class FailedWorkflow:
    workflow_id: str
    run_id: str
    workflow_type: str
    org_id: str | None
    event_type: str | None
    close_time: datetime | None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["close_time"] = self.close_time.isoformat() if self.close_time else None
        return data


def failures_query(org: str | None = None, task_queue: str | None = None) -> str:
    query = 'ExecutionStatus="Failed"'
    if org is not None:
        query += f' AND OrgId="{check_org_id(org)}"'
    if task_queue is not None:
        if '"' in task_queue:
            raise BillingError("a task queue name cannot contain quotes", code="INVALID_INPUT")
        query += f' AND TaskQueue="{task_queue}"'
    return query


async def list_failed(
    client: Client, *, org: str | None = None, task_queue: str | None = None
) -> list[FailedWorkflow]:
    """Failed workflows whose latest run is still the failed one (a retried workflow that now
    runs or succeeded is no longer a failure)."""
    found: list[FailedWorkflow] = []
    async for execution in client.list_workflows(failures_query(org, task_queue)):
        latest = await client.get_workflow_handle(execution.id).describe()
        if latest.run_id != execution.run_id:
            continue
        attributes = execution.typed_search_attributes
        found.append(FailedWorkflow(
            workflow_id=execution.id,
            run_id=execution.run_id,
            workflow_type=execution.workflow_type,
            org_id=attributes.get(ORG_ID),
            event_type=attributes.get(STRIPE_EVENT_TYPE),
            close_time=execution.close_time,
        ))
    return found


async def reset_to_first_task(client: Client, workflow_id: str, *,
                              reason: str = "billing retry") -> str:
    """Reset the latest run of `workflow_id` to its first workflow task; returns the new run id."""
    handle = client.get_workflow_handle(workflow_id)
    description = await handle.describe()
    if description.status not in RETRYABLE:
        status = description.status.name if description.status else "UNKNOWN"
        raise NotRetryable(f"{workflow_id} is {status}: only a failed workflow is retried")
    first_task: int | None = None
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            first_task = event.event_id
            break
    if first_task is None:
        raise NotRetryable(f"{workflow_id} never completed a workflow task to reset to")
    response = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id,
                                                 run_id=description.run_id),
            reason=reason,
            workflow_task_finish_event_id=first_task,
            request_id=str(uuid.uuid4()),
        )
    )
    return str(response.run_id)


async def retry_all_failed(
    client: Client, *, org: str | None = None, task_queue: str | None = None
) -> list[tuple[str, str]]:
    """Reset every failed workflow (of one organization when `org` is given):
    `(workflow id, new run id)` pairs."""
    return [
        (failed.workflow_id, await reset_to_first_task(client, failed.workflow_id))
        for failed in await list_failed(client, org=org, task_queue=task_queue)
    ]
