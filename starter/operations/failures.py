"""What needs an operator (SPEC §6): failed billing workflows, the dead letters, listed through
Temporal visibility (`ExecutionStatus="Failed" AND TaskQueue="..."`, optionally `AND OrgId="..."`)
with the root cause of their `WorkflowExecutionFailed` event, and Stripe events recorded
`unresolved`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import HistoryEventFilterType
from temporalio.api.failure.v1 import Failure
from temporalio.api.workflowservice.v1 import (
    GetWorkflowExecutionHistoryRequest,
)
from temporalio.client import (
    Client,
)
from temporalio.service import RPCError, RPCStatusCode

from billing.errors import InvalidInput
from billing.store.accounts import check_org_id
from billing.store.database import Database, Doc
from starter.operations.progress import OnProgress, bounded, no_progress
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE


@dataclass(frozen=True)
class FailedWorkflow:
    """Something that needs an operator: a failed workflow (`kind` `failed`), or a Stripe event
    whose outcome was recorded `unresolved` (nothing was written; `failure` says why)."""

    workflow_id: str
    run_id: str
    workflow_type: str
    org_id: str | None
    event_type: str | None
    failure: str | None
    close_time: datetime | None
    kind: str = "failed"

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
            raise InvalidInput("a task queue name cannot contain quotes")
        query += f' AND TaskQueue="{task_queue}"'
    return query


#: Failures that only say where something failed; the cause below them says what.
WRAPPERS = ("activity_failure_info", "child_workflow_execution_failure_info",
            "nexus_operation_execution_failure_info")


def root_cause(failure: Failure) -> str:
    """The failure below the activity and child workflow wrappers, with its application error
    type (`STRIPE_404: Stripe refused ...`): what went wrong, not `Activity task failed`. Causes
    below an application error are its Python `__cause__`, already summed up in its message."""
    while failure.HasField("cause") and failure.WhichOneof("failure_info") in WRAPPERS:
        failure = failure.cause
    kind = failure.application_failure_info.type if failure.HasField(
        "application_failure_info") else ""
    return f"{kind}: {failure.message}" if kind else failure.message


async def failure_message(client: Client, workflow_id: str, run_id: str) -> str | None:
    """The root cause recorded in the run's `WorkflowExecutionFailed` event (its close event)."""
    response = await client.workflow_service.get_workflow_execution_history(
        GetWorkflowExecutionHistoryRequest(
            namespace=client.namespace,
            execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            history_event_filter_type=HistoryEventFilterType.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT,
        )
    )
    for event in response.history.events:
        if event.HasField("workflow_execution_failed_event_attributes"):
            return root_cause(event.workflow_execution_failed_event_attributes.failure)
    return None


async def list_failed(
    client: Client, *, org: str | None = None, task_queue: str | None = None,
    on_progress: OnProgress = no_progress,
) -> list[FailedWorkflow]:
    """Failed workflows, newest first, whose latest run is still the failed one (a workflow
    retried or replayed since then is no longer a failure)."""
    query = failures_query(org, task_queue)
    executions = [execution async for execution in client.list_workflows(query)]
    on_progress(0, len(executions))

    async def inspect(workflow_id: str, run_id: str) -> tuple[bool, str | None]:
        try:
            latest = await client.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:  # deleted past retention meanwhile
                return False, None
            raise
        if latest.run_id != run_id:
            return False, None
        return True, await failure_message(client, workflow_id, run_id)

    inspected = await bounded((inspect(e.id, e.run_id) for e in executions), on_progress,
                               len(executions))
    return [
        FailedWorkflow(
            workflow_id=execution.id,
            run_id=execution.run_id,
            workflow_type=execution.workflow_type,
            org_id=execution.typed_search_attributes.get(ORG_ID),
            event_type=execution.typed_search_attributes.get(STRIPE_EVENT_TYPE),
            failure=message,
            close_time=execution.close_time,
        )
        for execution, (current, message) in zip(executions, inspected, strict=True)
        if current
    ]


async def list_unresolved(db: Database, *, org: str | None = None) -> list[FailedWorkflow]:
    """Stripe events recorded `unresolved`, newest first: completed workflows that wrote nothing
    (an unknown pack, no organization, a purchase that cannot be told), so they need an operator
    as much as a failure does. `billing replay EVT_ID` runs one again once it can resolve."""
    query: Doc = {"outcome": "unresolved"}
    if org is not None:
        query["org_id"] = check_org_id(org)
    cursor = db.stripe_events.find(query).sort("recorded_at", -1).limit(1000)
    return [
        FailedWorkflow(
            workflow_id=f"stripe-{doc['_id']}", run_id="", workflow_type="StripeEventWorkflow",
            org_id=doc.get("org_id"), event_type=doc.get("type"),
            failure=f"UNRESOLVED: {doc.get('reason') or 'no reason recorded'}",
            close_time=doc.get("recorded_at"), kind="unresolved",
        )
        async for doc in cursor
    ]
