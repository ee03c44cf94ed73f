"""Starting admin adjustments and deciding on them (used by the CLI; plain `temporal workflow
start` / `temporal workflow update execute` do the same, see the README)."""

from __future__ import annotations

import uuid

from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from billing.errors import BillingError
from billing.models import AdjustmentStatus, AdminRequest, AdminResult, DecisionRequest
from workflows.admin_adjustment import AdminAdjustmentWorkflow, admin_workflow_id


def new_request_id() -> str:
    return f"adj_{uuid.uuid4().hex[:16]}"


async def start_adjustment(
    client: Client, request: AdminRequest, task_queue: str
) -> tuple[WorkflowHandle[AdminAdjustmentWorkflow, AdminResult], bool]:
    """Start the adjustment; a request id already used returns the existing workflow.

    Returns the handle and whether this call started it.
    """
    workflow_id = admin_workflow_id(request.request_id)
    try:
        handle = await client.start_workflow(
            AdminAdjustmentWorkflow.run,
            request,
            id=workflow_id,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    except WorkflowAlreadyStartedError:
        return client.get_workflow_handle_for(AdminAdjustmentWorkflow.run, workflow_id), False
    return handle, True


class DecisionRefused(BillingError):
    """The workflow refused the decision (a self-approval, or a request that waits for none)."""

    status = 409
    code = "DECISION_REFUSED"


async def decide(
    client: Client, request_id: str, *, approve: bool, by: str, note: str = ""
) -> AdminResult:
    """Approve or reject through the `decide` update: the outcome once written, or
    `DecisionRefused` saying why the workflow would not take it."""
    handle = client.get_workflow_handle_for(
        AdminAdjustmentWorkflow.run, admin_workflow_id(request_id)
    )
    try:
        return await handle.execute_update(
            AdminAdjustmentWorkflow.decide,
            DecisionRequest(approve=approve, by=by, note=note),
        )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        raise DecisionRefused(getattr(cause, "message", None) or str(cause)) from exc
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND or "completed" not in exc.message:
            raise
        done = await handle.result()
        raise DecisionRefused(f"request {request_id} waits for no decision: it is "
                              f"{done.status}") from exc


async def adjustment_status(client: Client, request_id: str) -> AdjustmentStatus:
    handle = client.get_workflow_handle_for(
        AdminAdjustmentWorkflow.run, admin_workflow_id(request_id)
    )
    return await handle.query(AdminAdjustmentWorkflow.status)
