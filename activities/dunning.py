"""Dunning (SPEC §5.4): a subscription past due for `unpaid_after_days` becomes `unpaid`, and the
organization drops to the default plan unless another live subscription pays for one."""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from billing.models import (
    OrgPage,
    OrgSweep,
    OrgSweepResult,
    SweepPage,
)
from billing.runtime import Runtime
from billing.store.transactions import run_in_transaction


class DunningActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.subscriptions = runtime.subscriptions
        self.meters = runtime.meters

    async def _mark_unpaid(self, org_id: str, cutoff: datetime, now: datetime) -> bool:
        """One organization, one transaction; untouched if a payment cleared it meanwhile. Its
        plan is then derived again: another live subscription may still pay for one."""

        async def work(session: AsyncClientSession) -> bool:
            if not await self.subscriptions.mark_unpaid_in(session, org_id, cutoff, now):
                return False
            account = await self.runtime.db.accounts.find_one({"_id": org_id}, {"plan_id": 1},
                                                              session=session)
            found = await self.subscriptions.refresh_in(
                session, org_id, self.runtime.config,
                current_plan=(account or {}).get("plan_id"), now=now)
            await self.meters.apply_plan_change_in(session, org_id, found.plan_id, now,
                                                   seats=found.seats)
            return True

        return await run_in_transaction(self.runtime.db.client, work)

    def _cutoff(self, now: datetime) -> datetime:
        return now - timedelta(days=self.runtime.config.subscriptions.unpaid_after_days)

    @activity.defn(name="dunning_org_page")
    async def dunning_org_page(self, page: SweepPage) -> OrgPage:
        """Organizations with a subscription past due since the cutoff, paged by id."""
        orgs = await self.subscriptions.past_due_page(self._cutoff(page.now), page.after,
                                                      page.limit)
        return OrgPage(org_ids=orgs, next_after=orgs[-1] if len(orgs) == page.limit else None)

    @activity.defn(name="dunning_org")
    async def dunning_org(self, job: OrgSweep) -> OrgSweepResult:
        unpaid = await self._mark_unpaid(job.org_id, self._cutoff(job.now), job.now)
        return OrgSweepResult(org_id=job.org_id, changed=int(unpaid))
