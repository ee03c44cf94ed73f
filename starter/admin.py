"""Starting admin adjustments and deciding on them (used by the CLI; plain `temporal workflow
start` / `temporal workflow signal` do the same, see the README)."""

from __future__ import annotations

import uuid

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from billing.models import AdminRequest, AdminResult, Decision
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


async def decide(
    client: Client, request_id: str, *, approve: bool, by: str, note: str = ""
) -> None:
    handle = client.get_workflow_handle_for(
        AdminAdjustmentWorkflow.run, admin_workflow_id(request_id)
    )
    decision = Decision(by=by, note=note)
    if approve:
        await handle.signal(AdminAdjustmentWorkflow.approve, decision)
    else:
        await handle.signal(AdminAdjustmentWorkflow.reject, decision)
