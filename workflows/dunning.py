"""Daily dunning (schedule `dunning`, 01:00 UTC): long past-due subscriptions become `unpaid`, one
organization at a time (`workflows/org_sweep.py`)."""

from __future__ import annotations

from temporalio import workflow

from billing.models import DunningPageResult
from workflows.common import FAIL_ON
from workflows.org_sweep import PER_ORG, sweep_orgs


@workflow.defn(failure_exception_types=FAIL_ON)
class DunningWorkflow:
    @workflow.run
    async def run(self) -> DunningPageResult:
        now = workflow.now()
        workflow.deprecate_patch(PER_ORG)
        done, failed = await sweep_orgs("dunning", now)
        return DunningPageResult(unpaid=sum(d.changed for d in done), next_after=None,
                                 failed=failed)
