"""Daily sweeps one organization at a time (SPEC §6): the expiry and dunning sweeps page through
the organizations that have work and run one `OrgSweepWorkflow` child each, with a deterministic
id (`expire-<org>-<day>`, `dunning-<org>-<day>`) and `OrgId` set at start. An organization whose
work keeps failing fails its own child, visibly (`billing failures --org`, `billing retry`),
while the sweep goes on with the others.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import ChildWorkflowError, WorkflowAlreadyStartedError

from billing.models import OrgSweep, OrgSweepResult, SweepPage
from workflows import steps
from workflows.common import FAIL_ON, PAGE_TIMEOUT, call
from workflows.search import ORG_ID

#: Activity of each sweep: one organization's work, and one page of organizations that have some.
ACTIVITIES = {"expire": (steps.expire_org_lots, steps.expire_org_page),
              "dunning": (steps.dunning_org, steps.dunning_org_page)}
CONCURRENCY = 10
#: The release that runs sweeps one organization at a time. Deprecated: a sweep run lives less
#: than a day, so none of the releases before it can still be open; the call stays while runs
#: recorded with its marker may be (README, "Versioning workflows").
PER_ORG = "sweep-per-org"


def sweep_workflow_id(sweep: str, org_id: str, now: datetime) -> str:
    return f"{sweep}-{org_id}-{now:%Y-%m-%d}"


@workflow.defn(failure_exception_types=FAIL_ON)
class OrgSweepWorkflow:
    @workflow.run
    async def run(self, job: OrgSweep) -> OrgSweepResult:
        return await call(ACTIVITIES[job.sweep][0], job, start_to_close=PAGE_TIMEOUT)


async def sweep_orgs(sweep: str, now: datetime) -> tuple[list[OrgSweepResult], list[str]]:
    """Run the sweep's child for every organization with work; the results and the
    organizations whose child failed."""
    slots = asyncio.Semaphore(CONCURRENCY)
    done: list[OrgSweepResult] = []
    failed: list[str] = []

    async def one(org_id: str) -> None:
        async with slots:
            try:
                done.append(await workflow.execute_child_workflow(
                    OrgSweepWorkflow.run, OrgSweep(sweep=sweep, org_id=org_id, now=now),
                    id=sweep_workflow_id(sweep, org_id, now),
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                    search_attributes=TypedSearchAttributes([SearchAttributePair(ORG_ID,
                                                                                 org_id)]),
                ))
            except WorkflowAlreadyStartedError:
                pass  # another run of the sweep has this organization today
            except ChildWorkflowError:
                workflow.logger.warning("%s of %s failed", sweep, org_id)
                failed.append(org_id)

    after: str | None = None
    while True:
        page = await call(ACTIVITIES[sweep][1], SweepPage(now=now, after=after),
                          start_to_close=PAGE_TIMEOUT)
        await asyncio.gather(*(one(org) for org in page.org_ids))
        if page.next_after is None:
            return done, sorted(failed)
        after = page.next_after
