"""Daily expiry of credit lots (schedule `expire-credits`, 00:30 UTC), one organization at a time
(`workflows/org_sweep.py`)."""

from __future__ import annotations

from temporalio import workflow

from billing.models import ExpirePageResult
from workflows.common import FAIL_ON
from workflows.org_sweep import PER_ORG, sweep_orgs


@workflow.defn(failure_exception_types=FAIL_ON)
class ExpireCreditsWorkflow:
    @workflow.run
    async def run(self) -> ExpirePageResult:
        now = workflow.now()
        workflow.deprecate_patch(PER_ORG)
        done, failed = await sweep_orgs("expire", now)
        return ExpirePageResult(expired=sum(d.changed for d in done),
                                units=sum(d.units for d in done), next_after=None,
                                failed=failed)
