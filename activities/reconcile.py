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
    MissedEventsPage,
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
from billing.store.accounts import Accounts
from billing.store.reconcile import ReconcileStore


class ReconcileActivities:
    def __init__(self, runtime: Runtime, stripe: StripeApiActivities) -> None:
        self.config = runtime.config
        self.accounts = Accounts(runtime.db, runtime.config)
        self.store = ReconcileStore(runtime.db)
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
        """Checks (a) ledger and (b) meter for one page of organizations, in `_id` order, and
        their linked Stripe subscriptions for check (c)."""
        org_ids = await self.accounts.page_ids(page.after, page.limit)
        next_after = org_ids[-1] if len(org_ids) == page.limit else None
        if not org_ids:
            return ReconcilePageResult(org_ids=[], divergences=[], subscriptions=[],
                                       next_after=None)
        readings = await self.store.read_page(org_ids, page.week)
        tolerance = self.config.reconcile
        divergences: list[Divergence] = []
        for org in readings.orgs:
            divergences.extend(ledger_divergences(org.ledger))
            gap = meter_divergence(org.ledger.org_id, page.week, org.overflow, org.debited,
                                   tolerance)
            if gap is not None:
                divergences.append(gap)
        await self._report(divergences, page.report_id, page.started_at)
        return ReconcilePageResult(org_ids=[org.ledger.org_id for org in readings.orgs],
                                   divergences=divergences, subscriptions=readings.subscriptions,
                                   next_after=next_after)

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
