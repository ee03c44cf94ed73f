"""Weekly reset activities (SPEC §5.3): the page of organizations and one organization's reset."""

from __future__ import annotations

from temporalio import activity

from activities.errors import final_on_bad_input
from billing.models import ResetOrg, ResetOrgResult, ResetPage, ResetPageResult
from billing.runtime import Runtime


class ResetActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.meters = runtime.meters

    @activity.defn(name="weekly_reset_page")
    async def weekly_reset_page(self, page: ResetPage) -> ResetPageResult:
        """One page of organizations with a meter or a subscription, in `_id` order."""
        org_ids, next_after = await self.meters.reset_candidates(page.after, page.limit)
        return ResetPageResult(org_ids=org_ids, next_after=next_after)

    @activity.defn(name="weekly_reset_org")
    async def weekly_reset_org(self, job: ResetOrg) -> ResetOrgResult:
        """Open the week for one organization and settle its usage debt, in one transaction."""
        with final_on_bad_input():
            return await self.meters.reset_org(job.org_id, job.week, job.now)
