"""Daily dunning (schedule `dunning`, 01:00 UTC): long past-due subscriptions become `unpaid`."""

from __future__ import annotations

from temporalio import workflow

from billing.models import DunningPage, DunningPageResult
from workflows.common import FAIL_ON, call


@workflow.defn(failure_exception_types=FAIL_ON)
class DunningWorkflow:
    @workflow.run
    async def run(self) -> DunningPageResult:
        now = workflow.now()
        unpaid = 0
        after: str | None = None
        while True:
            page = await call("dunning_page", DunningPage(now=now, after=after), DunningPageResult)
            unpaid += page.unpaid
            if page.next_after is None:
                return DunningPageResult(unpaid=unpaid, next_after=None)
            after = page.next_after
