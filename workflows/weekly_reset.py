"""The weekly reset (schedule `weekly-reset`, Mondays 00:00 UTC, SPEC §5.3).

`WeeklyResetWorkflow` pages through the organizations with a meter or a subscription and runs
one `WeeklyResetOrgWorkflow` per organization (id `weekly-reset-<org>-<week>`), a bounded number
at a time, continuing as new after `pages_per_run` pages so the history stays short. A child id
that already ran (another sweep, a re-run) is skipped; a child that failed is retried by the next
sweep of the same week and stays visible in Temporal, searchable by `OrgId`.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

from temporalio import workflow
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ChildWorkflowError, WorkflowAlreadyStartedError

from billing.models import (
    ResetOrg,
    ResetOrgResult,
    ResetPage,
    WeeklyResetInput,
    WeeklyResetResult,
)
from billing.weeks import iso_week
from workflows import steps
from workflows.common import FAIL_ON, call
from workflows.search import ORG_ID


def reset_workflow_id(org_id: str, week: str) -> str:
    return f"weekly-reset-{org_id}-{week}"


@workflow.defn(failure_exception_types=FAIL_ON)
class WeeklyResetOrgWorkflow:
    @workflow.run
    async def run(self, job: ResetOrg) -> ResetOrgResult:
        return await call(steps.weekly_reset_org, job)


@workflow.defn(failure_exception_types=FAIL_ON)
class WeeklyResetWorkflow:
    @workflow.run
    async def run(self, params: WeeklyResetInput | None = None) -> WeeklyResetResult:
        state = params or WeeklyResetInput()
        now = workflow.now()
        week = state.week or iso_week(now)
        # A sliding window: the next child starts as soon as any running one ends.
        slots = asyncio.Semaphore(state.concurrency)

        async def bounded(org: str) -> ResetOrgResult | Literal["skipped", "failed"]:
            async with slots:
                return await self._reset(org, week, now)

        for _ in range(state.pages_per_run):
            page = await call(steps.weekly_reset_page,
                              ResetPage(after=state.after, limit=state.page_size))
            ids = page.org_ids
            results = await asyncio.gather(*(bounded(org) for org in ids))
            for org, result in zip(ids, results, strict=True):
                if isinstance(result, ResetOrgResult) and result.applied:
                    state.orgs += 1
                    state.settled_units += result.settled
                elif result == "failed":
                    state.failed.append(org)
                else:
                    state.skipped += 1
            state.after = page.next_after
            if state.after is None:
                return WeeklyResetResult(week=week, orgs=state.orgs,
                                         settled_units=state.settled_units,
                                         skipped=state.skipped, failed=state.failed)
        workflow.continue_as_new(state.model_copy(update={"week": week}))

    async def _reset(
        self, org_id: str, week: str, now: datetime
    ) -> ResetOrgResult | Literal["skipped", "failed"]:
        """One organization's child: its result, `"skipped"` when that child id already ran or
        is running under another sweep, `"failed"` when it failed."""
        try:
            result: ResetOrgResult = await workflow.execute_child_workflow(
                WeeklyResetOrgWorkflow.run,
                ResetOrg(org_id=org_id, week=week, now=now),
                id=reset_workflow_id(org_id, week),
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                search_attributes=TypedSearchAttributes([SearchAttributePair(ORG_ID, org_id)]),
            )
        except WorkflowAlreadyStartedError:
            return "skipped"
        except ChildWorkflowError:
            workflow.logger.warning("weekly reset of %s for %s failed", org_id, week)
            return "failed"
        return result
