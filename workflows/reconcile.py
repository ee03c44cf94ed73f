"""The reconciliation (schedule `reconcile`, daily 03:00 UTC; also `billing reconcile --now`).

Two phases, each paged and bounded:

1. **orgs**: every organization, in `_id` order, a page per activity: (a) the ledger against its
   entries and lots, (b) the week's metered overflow against its usage debits, then (c) each
   linked Stripe subscription against Stripe, a few organizations at a time. The page activity
   reads one organization at a time in bounded chunks and heartbeats its progress: a worker
   killed mid-page is noticed within `ORG_PAGE_HEARTBEAT` and the retry resumes where the last
   heartbeat left off.
2. **events**: (d) the handled Stripe events of the last `events_window_hours`, a page per
   activity; each one the engine has no outcome record of runs as the normal
   `StripeEventWorkflow` (child id `stripe-<evt id>`, the webhook's id and reuse policy), so a
   repair is the same change a delivery would have made, applied at most once.

The run continues as new after `pages_per_run` pages, carrying the report in progress, and
ends by writing it to the `reports` collection (`_id` = the workflow id). Divergences are
reported and notified (`reconcile.divergence`), never corrected here.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import (
    ActivityError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ParentClosePolicy

from billing.models import (
    REPORT_LIST_CAP,
    Divergence,
    EventListQuery,
    ReconcileInput,
    ReconcilePage,
    ReconcileReport,
    RepairedEvent,
    StripeEvent,
    SubscriptionCheck,
    SubscriptionRef,
)
from billing.weeks import iso_week
from workflows import steps
from workflows.common import FAIL_ON, PAGE_TIMEOUT, STRIPE_TIMEOUT, call
from workflows.stripe_event import StripeEventWorkflow, stripe_workflow_id

with workflow.unsafe.imports_passed_through():
    from billing.stripe.events import HANDLED_TYPES


#: One page of organizations (up to 1000, each read in chunks); a stalled attempt is caught by
#: the heartbeat timeout long before this.
ORG_PAGE_TIMEOUT = timedelta(minutes=10)
#: The page activity heartbeats after every organization and ledger chunk (each a bounded read).
ORG_PAGE_HEARTBEAT = timedelta(seconds=20)


def _orgs(divergences: list[Divergence]) -> int:
    return len({d.org_id for d in divergences})


def _add(report: ReconcileReport, divergences: list[Divergence]) -> None:
    report.divergences_total += len(divergences)
    room = REPORT_LIST_CAP - len(report.divergences)
    report.divergences.extend(divergences[:max(room, 0)])


@workflow.defn(failure_exception_types=FAIL_ON)
class ReconcileWorkflow:
    @workflow.run
    async def run(self, params: ReconcileInput | None = None) -> ReconcileReport:
        state = params or ReconcileInput()
        if state.report is None:
            now = workflow.now()
            state.report = ReconcileReport(
                report_id=workflow.info().workflow_id, started_at=now,
                week=state.week or iso_week(now),
                events_since=now - timedelta(hours=state.events_window_hours),
            )
        report = state.report
        for _ in range(state.pages_per_run):
            if state.phase == "orgs":
                await self._org_page(state, report)
            elif await self._events_page(state, report):
                report.finished_at = workflow.now()
                await call(steps.reconcile_write_report, report)
                return report
        workflow.continue_as_new(state)

    # ---- (a), (b), (c) ----------------------------------------------------------------------

    async def _org_page(self, state: ReconcileInput, report: ReconcileReport) -> None:
        page = await call(
            steps.reconcile_org_page,
            ReconcilePage(after=state.after, limit=state.page_size, week=report.week,
                          report_id=report.report_id, started_at=report.started_at),
            start_to_close=ORG_PAGE_TIMEOUT, heartbeat=ORG_PAGE_HEARTBEAT,
        )
        counts = report.counts
        counts.orgs += len(page.org_ids)
        counts.ledger_divergent += _orgs([d for d in page.divergences if d.check == "ledger"])
        counts.meter_divergent += _orgs([d for d in page.divergences if d.check == "meter"])
        _add(report, page.divergences)
        refs = page.subscriptions
        for start in range(0, len(refs), state.concurrency):
            chunk = refs[start:start + state.concurrency]
            for found in await asyncio.gather(*(self._subscription(ref, report) for ref in chunk)):
                if found is None:
                    counts.subscriptions_unverified += 1
                    continue
                counts.subscriptions_checked += 1
                counts.subscription_divergent += 1 if found else 0
                _add(report, found)
        state.after = page.next_after
        if state.after is None:
            state.phase = "events"

    async def _subscription(
        self, ref: SubscriptionRef, report: ReconcileReport
    ) -> list[Divergence] | None:
        """The subscription's divergences, or None when Stripe could not be read."""
        try:
            return await call(
                steps.reconcile_subscription,
                SubscriptionCheck(ref=ref, report_id=report.report_id,
                                  started_at=report.started_at),
                start_to_close=STRIPE_TIMEOUT,
            )
        except ActivityError:
            workflow.logger.warning("subscription %s of %s could not be read from Stripe",
                                    ref.subscription_id, ref.org_id)
            return None

    # ---- (d) --------------------------------------------------------------------------------

    async def _events_page(self, state: ReconcileInput, report: ReconcileReport) -> bool:
        """One page of recent events; True when it was the last, or when Stripe cannot be read
        (the report then says why, and keeps what the other checks found)."""
        try:
            page = await call(
                steps.reconcile_missed_events,
                EventListQuery(created_gte=int(report.events_since.timestamp()),
                               types=sorted(HANDLED_TYPES), starting_after=state.events_after,
                               limit=state.events_page_size),
                start_to_close=PAGE_TIMEOUT,
            )
        except ActivityError as exc:
            report.events_error = str(exc.cause or exc)
            return True
        counts = report.counts
        counts.events_listed += page.listed
        counts.events_missed += len(page.missed)
        for start in range(0, len(page.missed), state.concurrency):
            chunk = page.missed[start:start + state.concurrency]
            for repaired in await asyncio.gather(*(self._repair(event) for event in chunk)):
                if repaired is None:
                    counts.events_already_started += 1
                    continue
                if repaired.outcome == "failed":
                    counts.events_failed += 1
                else:
                    counts.events_repaired += 1
                if len(report.repaired_events) < REPORT_LIST_CAP:
                    report.repaired_events.append(repaired)
        state.events_after = page.next_after
        return state.events_after is None

    async def _repair(self, event: StripeEvent) -> RepairedEvent | None:
        """Run the event's normal workflow; None when `stripe-<evt id>` already exists (running,
        or closed: a failed run stays the dead letter for an operator to reset)."""
        try:
            outcome = await workflow.execute_child_workflow(
                StripeEventWorkflow.run,
                event,
                id=stripe_workflow_id(event.id),
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
        except WorkflowAlreadyStartedError:
            return None
        except ChildWorkflowError:
            workflow.logger.warning("repairing missed event %s failed", event.id)
            return RepairedEvent(event_id=event.id, type=event.type, outcome="failed")
        return RepairedEvent(event_id=event.id, type=event.type, outcome=outcome.outcome)

