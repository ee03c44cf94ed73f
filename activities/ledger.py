"""Ledger activities: the writes of SPEC §5.1 that workflows orchestrate."""

from __future__ import annotations

from temporalio import activity

from billing.models import (
    OrgPage,
    OrgSweep,
    OrgSweepResult,
    SweepPage,
)
from billing.runtime import Runtime


class LedgerActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @activity.defn(name="expire_org_page")
    async def expire_org_page(self, page: SweepPage) -> OrgPage:
        """Organizations with an expired lot the sweep has not looked at yet, paged by id."""
        orgs = await self.runtime.ledger.orgs_with_expired_lots(page.now, page.after, page.limit)
        return OrgPage(org_ids=orgs, next_after=orgs[-1] if len(orgs) == page.limit else None)

    @activity.defn(name="expire_org_lots")
    async def expire_org_lots(self, job: OrgSweep) -> OrgSweepResult:
        """Expire one organization's expired lots, each in its own transaction."""
        expired = units = 0
        for lot_id in await self.runtime.ledger.expired_lots(job.org_id, job.now):
            result = await self.runtime.ledger.expire(job.org_id, lot_id, job.now)
            if result.applied:
                expired += 1
                units -= result.amount
        return OrgSweepResult(org_id=job.org_id, changed=expired, units=units)
