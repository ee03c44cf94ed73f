"""Daily dunning (schedule `dunning`, 01:00 UTC): long past-due subscriptions become `unpaid`, one
organization at a time (`workflows/org_sweep.py`)."""

from __future__ import annotations

from temporalio import workflow

from billing.models import DunningPage, DunningPageResult
from workflows import steps
from workflows.common import FAIL_ON, call
from workflows.org_sweep import PER_ORG, sweep_orgs


@workflow.defn(failure_exception_types=FAIL_ON)
class DunningWorkflow:
    @workflow.run
    async def run(self) -> DunningPageResult:
        now = workflow.now()
        if workflow.patched(PER_ORG):
            done, failed = await sweep_orgs("dunning", now)
            return DunningPageResult(unpaid=sum(d.changed for d in done), next_after=None,
                                     failed=failed)
        unpaid = 0
        after: str | None = None
        while True:
            page = await call(steps.dunning_page, DunningPage(now=now, after=after))
            unpaid += page.unpaid
            if page.next_after is None:
                return DunningPageResult(unpaid=unpaid, next_after=None)
            after = page.next_after
