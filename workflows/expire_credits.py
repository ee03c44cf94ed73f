"""Daily expiry of credit lots (schedule `expire-credits`, 00:30 UTC), one organization at a time
(`workflows/org_sweep.py`)."""

from __future__ import annotations

from temporalio import workflow

from billing.models import ExpirePage, ExpirePageResult
from workflows import steps
from workflows.common import FAIL_ON, call
from workflows.org_sweep import PER_ORG, sweep_orgs


@workflow.defn(failure_exception_types=FAIL_ON)
class ExpireCreditsWorkflow:
    @workflow.run
    async def run(self) -> ExpirePageResult:
        now = workflow.now()
        if workflow.patched(PER_ORG):
            done, failed = await sweep_orgs("expire", now)
            return ExpirePageResult(expired=sum(d.changed for d in done),
                                    units=sum(d.units for d in done), next_after=None,
                                    failed=failed)
        total = ExpirePageResult(expired=0, units=0, next_after=None)
        after: str | None = None
        while True:
            page = await call(steps.expire_credit_page, ExpirePage(now=now, after=after))
            total = ExpirePageResult(expired=total.expired + page.expired,
                                     units=total.units + page.units, next_after=None)
            if page.next_after is None:
                return total
            after = page.next_after
