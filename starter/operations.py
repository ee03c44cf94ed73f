"""Operator tooling (SPEC §6): failed workflows, retry, replay and the engine's schedules.

A failed run is the dead letter. A failure is listed through Temporal visibility
(`ExecutionStatus="Failed" AND TaskQueue="..."`, optionally `AND OrgId="..."`) with the root cause
of its `WorkflowExecutionFailed` event; a retry resets the run to its first workflow task, so the
whole workflow runs again under the same id; a replay starts a new run of `stripe-<evt id>` that
retrieves the event from Stripe. Every write is idempotent by key, so running again is safe.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from google.protobuf.empty_pb2 import Empty
from pydantic import ValidationError
from temporalio.api.batch.v1 import BatchOperationReset
from temporalio.api.common.v1 import ResetOptions, WorkflowExecution
from temporalio.api.enums.v1 import BatchOperationState, EventType, HistoryEventFilterType
from temporalio.api.failure.v1 import Failure
from temporalio.api.workflowservice.v1 import (
    DescribeBatchOperationRequest,
    GetWorkflowExecutionHistoryRequest,
    ResetWorkflowExecutionRequest,
    StartBatchOperationRequest,
)
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleCalendarSpec,
    ScheduleDescription,
    ScheduleRange,
    ScheduleSpec,
    WorkflowExecutionStatus,
    WorkflowFailureError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from billing.config import Settings
from billing.errors import BillingError, InvalidInput, NotFound
from billing.models import StripeEventOutcome, StripeReplay
from billing.store.accounts import check_org_id
from billing.store.database import Database, Doc
from starter.schedules import SCHEDULES
from worker import connect
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE
from workflows.stripe_event import StripeEventWorkflow, stripe_workflow_id

T = TypeVar("T")

#: `(done, total)`; total is None while unknown.
OnProgress = Callable[[int, int | None], None]

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
#: Visibility reads and histories fetched at once while listing failures.
CONCURRENCY = 8
POLL_S = 0.5


class NotRetryable(BillingError):
    status = 409
    code = "NOT_RETRYABLE"


class EventRunning(BillingError):
    status = 409
    code = "EVENT_RUNNING"


class TemporalUnavailable(BillingError):
    status = 503
    code = "TEMPORAL_UNAVAILABLE"


class BatchUnsupported(Exception):
    """The server refuses batch operations (disabled or not implemented)."""


async def connect_client(settings: Settings) -> Client:
    """The engine's Temporal client; an unreachable server is a `TemporalUnavailable`."""
    try:
        return await connect(settings)
    except RuntimeError as exc:
        raise TemporalUnavailable(
            f"cannot reach Temporal at {settings.temporal_address}: {exc}"
        ) from exc


def _noop(done: int, total: int | None) -> None:
    return None


# ---- failures ----------------------------------------------------------------------------------


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


async def _bounded(items: Iterable[Awaitable[T]], on_progress: OnProgress,
                   total: int) -> list[T]:
    """Await `items` at most `CONCURRENCY` at a time, in order, reporting each one done."""
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def one(item: Awaitable[T]) -> T:
        nonlocal done
        async with gate:
            result = await item
        done += 1
        on_progress(done, total)
        return result

    return list(await asyncio.gather(*(one(item) for item in items)))


async def list_failed(
    client: Client, *, org: str | None = None, task_queue: str | None = None,
    on_progress: OnProgress = _noop,
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

    inspected = await _bounded((inspect(e.id, e.run_id) for e in executions), on_progress,
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


# ---- retry -------------------------------------------------------------------------------------


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
                      on_progress: OnProgress = _noop) -> RetryReport:
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
                     on_progress: OnProgress = _noop) -> RetryReport:
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
    on_listing: OnProgress = _noop, on_progress: OnProgress = _noop,
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


# ---- replay ------------------------------------------------------------------------------------


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


# ---- schedules ---------------------------------------------------------------------------------

DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


def _ranges(ranges: Sequence[ScheduleRange], full: tuple[int, int],
            name: Callable[[int], str]) -> str:
    if len(ranges) == 1 and (ranges[0].start, ranges[0].end, ranges[0].step) == (*full, 1):
        return "*"
    parts = []
    for r in ranges:
        text = name(r.start) if r.end == r.start else f"{name(r.start)}-{name(r.end)}"
        parts.append(text + (f"/{r.step}" if r.step > 1 else ""))
    return ",".join(parts)


def _calendar_text(calendar: ScheduleCalendarSpec) -> str:
    days = _ranges(calendar.day_of_week, (0, 6), lambda d: DAYS[d % 7])
    month_days = _ranges(calendar.day_of_month, (1, 31), str)
    two = "{:02d}".format
    time = (f"{_ranges(calendar.hour, (0, 23), two)}:{_ranges(calendar.minute, (0, 59), two)}")
    seconds = _ranges(calendar.second, (0, 59), two)
    if seconds != "00":
        time += f":{seconds}"
    when = "daily" if days == "*" else days
    if month_days != "*":
        when += f" on day {month_days}"
    return f"{when} {time}"


def spec_text(spec: ScheduleSpec) -> str:
    """A schedule's times for people: `Mon 00:00 UTC`, `daily 00:30 UTC`."""
    parts = [_calendar_text(c) for c in spec.calendars]
    parts += [f"every {i.every}" for i in spec.intervals]
    parts += list(spec.cron_expressions)
    return "; ".join(parts) + f" {spec.time_zone_name or 'UTC'}"


@dataclass(frozen=True)
class ScheduleView:
    id: str
    workflow: str
    exists: bool
    spec: str | None = None
    next_runs: list[datetime] = field(default_factory=list)
    paused: bool = False
    overlap: str | None = None
    last_run: datetime | None = None
    last_workflow_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_runs"] = [t.isoformat() for t in self.next_runs]
        data["last_run"] = self.last_run.isoformat() if self.last_run else None
        return data


def _view(description: ScheduleDescription, workflow: str) -> ScheduleView:
    schedule, info = description.schedule, description.info
    action = schedule.action
    last = info.recent_actions[-1] if info.recent_actions else None
    started = last.action if last else None
    return ScheduleView(
        id=description.id,
        workflow=action.workflow if isinstance(action, ScheduleActionStartWorkflow) else workflow,
        exists=True,
        spec=spec_text(schedule.spec),
        next_runs=list(info.next_action_times),
        paused=bool(schedule.state.paused),
        overlap=schedule.policy.overlap.name,
        last_run=last.started_at if last else None,
        last_workflow_id=started.workflow_id
        if isinstance(started, ScheduleActionExecutionStartWorkflow) else None,
    )


async def _describe(client: Client, schedule_id: str) -> ScheduleDescription | None:
    try:
        return await client.get_schedule_handle(schedule_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def list_schedules(client: Client) -> list[ScheduleView]:
    """Every schedule the engine defines, as the server has it (missing until a worker ran)."""
    views = []
    for definition in SCHEDULES:
        description = await _describe(client, definition.id)
        views.append(_view(description, definition.workflow) if description
                     else ScheduleView(id=definition.id, workflow=definition.workflow,
                                       exists=False))
    return views


@dataclass(frozen=True)
class TriggerResult:
    schedule_id: str
    workflow_id: str | None  # None: skipped by the overlap policy, or not seen in time
    skipped: bool


async def trigger_schedule(client: Client, name: str, *, wait_s: float = 10.0) -> TriggerResult:
    """Run a schedule's action now, under the schedule's own overlap policy, and return the
    workflow id it started (seen in the schedule's recent actions)."""
    names = [definition.id for definition in SCHEDULES]
    if name not in names:
        raise InvalidInput(f"unknown schedule {name!r}: one of {', '.join(names)}")
    before = await _describe(client, name)
    if before is None:
        raise NotFound(f"schedule {name!r} does not exist: the worker creates it at start")
    handle = client.get_schedule_handle(name)
    await handle.trigger(overlap=before.schedule.policy.overlap)
    deadline = asyncio.get_running_loop().time() + wait_s
    while asyncio.get_running_loop().time() < deadline:
        info = (await handle.describe()).info
        if info.num_actions_skipped_overlap > before.info.num_actions_skipped_overlap:
            return TriggerResult(name, None, skipped=True)
        if info.num_actions > before.info.num_actions and info.recent_actions:
            action = info.recent_actions[-1].action
            workflow_id = action.workflow_id \
                if isinstance(action, ScheduleActionExecutionStartWorkflow) else None
            return TriggerResult(name, workflow_id, skipped=False)
        await asyncio.sleep(POLL_S)
    return TriggerResult(name, None, skipped=False)
