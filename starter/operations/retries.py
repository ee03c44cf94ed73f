"""`billing retry`: a failed run is reset to its first workflow task, so the whole workflow runs
again under the same id. Every write is idempotent by key, so running again is safe."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf.empty_pb2 import Empty
from temporalio.api.batch.v1 import BatchOperationReset
from temporalio.api.common.v1 import ResetOptions, WorkflowExecution
from temporalio.api.enums.v1 import BatchOperationState, EventType
from temporalio.api.workflowservice.v1 import (
    DescribeBatchOperationRequest,
    ResetWorkflowExecutionRequest,
    StartBatchOperationRequest,
)
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
)
from temporalio.service import RPCError, RPCStatusCode

from billing.errors import BillingError
from starter.operations.failures import FailedWorkflow, list_failed
from starter.operations.progress import POLL_S, OnProgress, no_progress

#: A workflow in one of these states can be retried; a running or completed one cannot.
RETRYABLE = frozenset(
    {
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.TIMED_OUT,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.CANCELED,
    }
)

#: Temporal's default `frontend.MaxExecutionCountBatchOperationPerNamespace`.
BATCH_SIZE = 1000


class NotRetryable(BillingError):
    status = 409
    code = "NOT_RETRYABLE"


class BatchUnsupported(Exception):
    """The server refuses batch operations (disabled or not implemented)."""




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


@dataclass(frozen=True)
class RetryReport:
    """What `retry --all-failed` did: the failed workflows it found and how their resets went."""

    method: Literal["batch", "per-workflow"]
    workflow_ids: list[str]
    reset: int = 0
    failed: int = 0
    job_ids: list[str] = field(default_factory=list)


async def _wait_for_batch(client: Client, job_id: str, size: int, done_before: int,
                          total: int, on_progress: OnProgress) -> tuple[int, int]:
    """Poll `DescribeBatchOperation` until the job ends: `(reset, failed)`."""
    while True:
        job = await client.workflow_service.describe_batch_operation(
            DescribeBatchOperationRequest(namespace=client.namespace, job_id=job_id))
        reset, failed = job.complete_operation_count, job.failure_operation_count
        on_progress(done_before + reset + failed, total)
        if job.state not in (BatchOperationState.BATCH_OPERATION_STATE_RUNNING,
                             BatchOperationState.BATCH_OPERATION_STATE_UNSPECIFIED):
            # A job that ended early (FAILED) did not reach the rest of its executions.
            return reset, max(failed, size - reset)
        await asyncio.sleep(POLL_S)


async def batch_reset(client: Client, failed: Sequence[FailedWorkflow], *, reason: str,
                      on_progress: OnProgress = no_progress) -> RetryReport:
    """Reset exactly these runs to their first workflow task with Temporal batch operations
    (`BATCH_SIZE` executions per job, one job at a time), waiting for each job to finish."""
    job_ids: list[str] = []
    reset = errors = 0
    for start in range(0, len(failed), BATCH_SIZE):
        chunk = failed[start:start + BATCH_SIZE]
        job_id = f"billing-retry-{uuid.uuid4()}"
        try:
            await client.workflow_service.start_batch_operation(StartBatchOperationRequest(
                namespace=client.namespace,
                job_id=job_id,
                reason=reason,
                executions=[WorkflowExecution(workflow_id=f.workflow_id, run_id=f.run_id)
                            for f in chunk],
                reset_operation=BatchOperationReset(
                    identity="billing retry",
                    options=ResetOptions(first_workflow_task=Empty()),
                ),
            ))
        except RPCError as exc:
            if exc.status in (RPCStatusCode.UNIMPLEMENTED, RPCStatusCode.PERMISSION_DENIED) \
                    and start == 0:
                raise BatchUnsupported(str(exc)) from exc
            raise
        job_ids.append(job_id)
        done, bad = await _wait_for_batch(client, job_id, len(chunk), reset + errors,
                                          len(failed), on_progress)
        reset, errors = reset + done, errors + bad
    return RetryReport(method="batch", workflow_ids=[f.workflow_id for f in failed],
                       reset=reset, failed=errors, job_ids=job_ids)


async def reset_each(client: Client, failed: Sequence[FailedWorkflow], *, reason: str,
                     on_progress: OnProgress = no_progress) -> RetryReport:
    """One `ResetWorkflowExecution` per workflow: for a server without batch operations."""
    reset = errors = 0
    for failure in failed:
        try:
            await reset_to_first_task(client, failure.workflow_id, reason=reason)
            reset += 1
        except (NotRetryable, RPCError):
            errors += 1  # retried or replayed meanwhile, or gone past retention
        on_progress(reset + errors, len(failed))
    return RetryReport(method="per-workflow", workflow_ids=[f.workflow_id for f in failed],
                       reset=reset, failed=errors)


async def retry_all_failed(
    client: Client, *, org: str | None = None, task_queue: str | None = None,
    on_listing: OnProgress = no_progress, on_progress: OnProgress = no_progress,
) -> RetryReport:
    """Reset every failed workflow of the task queue (of one organization when `org` is given).

    The batch names the listed runs rather than passing the visibility query on: the query also
    matches failed runs that a later retry or replay already superseded, and resetting those
    would run their workflows once more."""
    failed = await list_failed(client, org=org, task_queue=task_queue, on_progress=on_listing)
    if not failed:
        return RetryReport(method="batch", workflow_ids=[])
    reason = f"billing retry --all-failed{f' --org {org}' if org else ''}"
    try:
        return await batch_reset(client, failed, reason=reason, on_progress=on_progress)
    except BatchUnsupported:
        return await reset_each(client, failed, reason=reason, on_progress=on_progress)
