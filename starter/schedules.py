"""The engine's schedules (SPEC §6), created idempotently by the worker at start."""

from __future__ import annotations

from dataclasses import dataclass

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
)

from workflows.dunning import DunningWorkflow
from workflows.expire_credits import ExpireCreditsWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.weekly_reset import WeeklyResetWorkflow


@dataclass(frozen=True)
class ScheduleDef:
    id: str
    workflow: str
    hour: int
    minute: int
    day_of_week: int | None = None  # 0 = Sunday ... 6 = Saturday; None = every day

    def spec(self) -> ScheduleSpec:
        calendar = ScheduleCalendarSpec(
            hour=[ScheduleRange(self.hour)],
            minute=[ScheduleRange(self.minute)],
            second=[ScheduleRange(0)],
            day_of_week=[ScheduleRange(self.day_of_week)] if self.day_of_week is not None
            else [ScheduleRange(0, 6)],
        )
        return ScheduleSpec(calendars=[calendar], time_zone_name="UTC")


SCHEDULES: tuple[ScheduleDef, ...] = (
    ScheduleDef("weekly-reset", WeeklyResetWorkflow.__name__, hour=0, minute=0, day_of_week=1),
    ScheduleDef("expire-credits", ExpireCreditsWorkflow.__name__, hour=0, minute=30),
    ScheduleDef("dunning", DunningWorkflow.__name__, hour=1, minute=0),
    ScheduleDef("reconcile", ReconcileWorkflow.__name__, hour=3, minute=0),
)


async def ensure_schedules(client: Client, task_queue: str) -> list[str]:
    """Create every schedule that does not exist yet (overlap SKIP); return the ids created."""
    created = []
    for definition in SCHEDULES:
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                definition.workflow, id=definition.id, task_queue=task_queue
            ),
            spec=definition.spec(),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        try:
            await client.create_schedule(definition.id, schedule)
        except ScheduleAlreadyRunningError:
            continue
        created.append(definition.id)
    return created
