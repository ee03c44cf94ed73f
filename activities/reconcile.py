"""Reconciliation activities (SPEC §6, issue 5): read, compare, report. None of them changes a
balance; a missed Stripe event is repaired by the workflow starting the normal event workflow."""

from __future__ import annotations

from datetime import datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.stripe_api import StripeApiActivities
from billing.metrics import RECONCILE_DIVERGENCES
from billing.models import (
    Divergence,
    EventListQuery,
    LedgerSums,
    MissedEventsPage,
    PageProgress,
    ReconcilePage,
    ReconcilePageResult,
    ReconcileReport,
    SubscriptionCheck,
)
from billing.reconcile import (
    ledger_divergences,
    meter_divergence,
    missing_subscription,
    subscription_divergences,
)
from billing.runtime import Runtime


class ReconcileActivities:
    def __init__(self, runtime: Runtime, stripe: StripeApiActivities) -> None:
        self.config = runtime.config
        self.accounts = runtime.accounts
        self.store = runtime.reports
        self.stripe = stripe

    async def _report(
        self, divergences: list[Divergence], report_id: str, started_at: datetime
    ) -> None:
        """Log each divergence, notify its organization (once a day per check), then count it."""
        for d in divergences:
            activity.logger.warning(
                "reconcile: %s divergence %s on %s: expected %s, found %s", d.check, d.kind,
                d.subject, d.expected, d.actual, extra={"org_id": d.org_id})
        await self.store.notify_divergences(divergences, report_id=report_id,
                                            started_at=started_at)
        for d in divergences:
            RECONCILE_DIVERGENCES.labels(d.check).inc()

    @activity.defn(name="reconcile_org_page")
    async def org_page(self, page: ReconcilePage) -> ReconcilePageResult:
        """Checks (a) ledger and (b) meter for one page of organizations, in `_id` order, one
        organization at a time, and collects their linked Stripe subscriptions for check (c).

        Heartbeats its `PageProgress` after every organization and every ledger chunk; a retry
        resumes from the last one, so a done organization is not read again, nor a chunk."""
        details = activity.info().heartbeat_details
        progress = (PageProgress.model_validate(details[0]) if details else
                    PageProgress(org_ids=await self.accounts.page_ids(page.after, page.limit)))
        tolerance = self.config.reconcile

        def beat(sums: LedgerSums) -> None:
            progress.current = sums
            activity.heartbeat(progress.model_copy(deep=True))

        for org_id in progress.org_ids[progress.done:]:
            current = progress.current
            sums = current if current is not None and current.org_id == org_id else (
                LedgerSums(org_id=org_id))
            readings = await self.store.read_org(sums, page.week, beat)
            if readings is not None:
                divergences = ledger_divergences(readings.ledger)
                gap = meter_divergence(org_id, page.week, readings.overflow, readings.debited,
                                       tolerance)
                if gap is not None:
                    divergences.append(gap)
                await self._report(divergences, page.report_id, page.started_at)
                progress.checked.append(org_id)
                progress.divergences.extend(divergences)
                progress.subscriptions.extend(readings.subscriptions)
            progress.done += 1
            progress.current = None
            activity.heartbeat(progress.model_copy(deep=True))
        full = len(progress.org_ids) == page.limit
        return ReconcilePageResult(org_ids=progress.checked, divergences=progress.divergences,
                                   subscriptions=progress.subscriptions,
                                   next_after=progress.org_ids[-1] if full else None)

    @activity.defn(name="reconcile_subscription")
    async def subscription(self, check: SubscriptionCheck) -> list[Divergence]:
        """Check (c): the engine's subscription status and plan against Stripe's."""
        ref = check.ref
        try:
            stripe_subscription = await self.stripe.retrieve_subscription(ref.subscription_id)
        except ApplicationError as exc:
            if exc.type != "STRIPE_404":
                raise  # outages retry; a bad key or a missing API key fails the check
            divergences = [missing_subscription(ref.org_id, ref.subscription_id, exc.message)]
        else:
            divergences = subscription_divergences(
                self.config, ref.org_id, status=ref.status, plan_id=ref.plan_id,
                stripe_subscription=stripe_subscription)
        await self._report(divergences, check.report_id, check.started_at)
        return divergences

    @activity.defn(name="reconcile_missed_events")
    async def missed_events(self, query: EventListQuery) -> MissedEventsPage:
        """Check (d): one page of recent Stripe events and those of them the engine has no
        outcome record of (never delivered, or delivered but never applied)."""
        page = await self.stripe.list_events(query)
        recorded = await self.store.recorded_events([event.id for event in page.events])
        return MissedEventsPage(
            listed=len(page.events),
            missed=[event for event in page.events if event.id not in recorded],
            next_after=page.last_id if page.has_more else None,
        )

    @activity.defn(name="reconcile_write_report")
    async def write_report(self, report: ReconcileReport) -> None:
        await self.store.write_report(report)
