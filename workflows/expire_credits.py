"""Daily expiry of credit lots (schedule `expire-credits`, 00:30 UTC)."""

from __future__ import annotations

from temporalio import workflow

from billing.models import ExpirePage, ExpirePageResult
from workflows.common import FAIL_ON, call


@workflow.defn(failure_exception_types=FAIL_ON)
class ExpireCreditsWorkflow:
    @workflow.run
    async def run(self) -> ExpirePageResult:
        now = workflow.now()
        total = ExpirePageResult(expired=0, units=0, next_after=None)
        after: str | None = None
        while True:
            page = await call("expire_credit_page", ExpirePage(now=now, after=after),
                              ExpirePageResult)
            total = ExpirePageResult(expired=total.expired + page.expired,
                                     units=total.units + page.units, next_after=None)
            if page.next_after is None:
                return total
            after = page.next_after
