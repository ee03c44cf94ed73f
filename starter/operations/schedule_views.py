"""`billing schedules`: the engine's schedules as the server has them, and running one now."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleCalendarSpec,
    ScheduleDescription,
    ScheduleRange,
    ScheduleSpec,
)
from temporalio.service import RPCError, RPCStatusCode

from billing.errors import InvalidInput, NotFound
from starter.operations.progress import POLL_S
from starter.schedules import SCHEDULES

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
