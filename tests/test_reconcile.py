"""ReconcileWorkflow end to end, on the real worker with Stripe at the local fake.

The database is shared with the rest of the suite, so every assertion is scoped to the
organizations and events this module creates.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from cli_helpers import billing
from prometheus_client import REGISTRY
from stripe_fake import StripeFake
from stripe_payloads import deliver, event, metadata, new_id, payment_intent, subscription
from temporalio.client import Client

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.metering import UsageRequest
from billing.models import (
    Divergence,
    ReconcileCounts,
    ReconcileInput,
    ReconcileReport,
    RepairedEvent,
    StripeEventOutcome,
)
from billing.runtime import Runtime
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.meters import Meters
from billing.store.reconcile import ReconcileStore
from billing.weeks import iso_week
from workflows.reconcile import ReconcileWorkflow

Obj = dict[str, Any]
PACK = "pack_500k"
PRO_PRICE = "price_pro_monthly"


def new_org(label: str) -> str:
    return f"rec-{label}-{uuid.uuid4().hex[:8]}"


@dataclass
class Orgs:
    balance_off: str
    lot_off: str
    gap_600: str
    gap_400: str
    sub_differs: str
    sub_agrees: str
    missed: str
    delivered: str

    def all(self) -> list[str]:
        return list(vars(self).values())


async def overflow_week(db: Database, config: BillingConfig, org: str, gap: int) -> None:
    """100000 units of overflow debited this week (quota 0), then the meter side short by
    `gap`: the meter claims 100000 - gap while the debits say 100000."""
    await Accounts(db, config).ensure_in(None, org, utcnow())
    meters = Meters(db, config)
    for run in range(10):
        result = await meters.record(UsageRequest(org_id=org, run_id=f"run-{run}", units=10000),
                                     utcnow())
        assert result.overflow == 10000
    await db.meters.update_one({"org_id": org, "week": iso_week(utcnow())},
                               {"$inc": {"overflow": -gap}})


async def settle_subscription(api: httpx.AsyncClient, client: Client, fake: StripeFake,
                              org: str, stripe_status: str) -> str:
    """The engine applies an active pro subscription; Stripe now says `stripe_status`."""
    sub, customer = new_id("sub"), new_id("cus")
    obj = subscription(sub=sub, customer=customer, price=PRO_PRICE, meta=metadata(org))
    evt = event("customer.subscription.created", obj)
    assert (await deliver(api, evt)).json()["status"] == "started"
    handle = client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)
    assert (await handle.result()).outcome == "applied"
    fake.add({**obj, "status": stripe_status})
    return sub


def of(report: ReconcileReport, org: str) -> list[tuple[str, str, Any, Any]]:
    return sorted((d.check, d.kind, d.expected, d.actual)
                  for d in report.divergences if d.org_id == org)


async def notifications(db: Database, org: str) -> list[Obj]:
    return [doc async for doc in db.notifications.find(
        {"org_id": org, "type": "reconcile.divergence"})]


def divergences_counted() -> Counter[str]:
    counted = Counter[str]()
    for check in ("ledger", "meter", "subscription"):
        value = REGISTRY.get_sample_value("billing_reconcile_divergences_total", {"check": check})
        assert value is not None  # the series exists before the first divergence
        counted[check] = int(value)
    return counted


async def topups(db: Database, org: str) -> int:
    return await db.ledger.count_documents({"org_id": org, "kind": "topup"})


async def test_reconcile_reports_divergences_and_repairs_a_missed_event_once(
    api: httpx.AsyncClient, stripe_worker: Any, stripe_fake: StripeFake,
    stripe_runtime: Runtime, temporal_client: Client, db: Database, config: BillingConfig,
) -> None:
    orgs = Orgs(*(new_org(label) for label in (
        "balance", "lot", "gap600", "gap400", "subdiff", "subok", "missed", "delivered")))
    accounts = Accounts(db, config)

    # (a) ledger: an account balance and a lot's remaining changed behind the ledger's back.
    await accounts.register(orgs.balance_off, utcnow())
    await db.accounts.update_one({"_id": orgs.balance_off}, {"$inc": {"balance": 7}})
    await accounts.register(orgs.lot_off, utcnow())
    await db.accounts.update_one({"_id": orgs.lot_off}, {"$inc": {"lots.0.remaining": -100}})
    # (b) meter vs debits: a gap of 600 on 100000 is above max(50, 0.5 %), one of 400 is not.
    await overflow_week(db, config, orgs.gap_600, 600)
    await overflow_week(db, config, orgs.gap_400, 400)
    # (c) subscriptions: Stripe moved one to past_due without the engine hearing of it.
    differs = await settle_subscription(api, temporal_client, stripe_fake, orgs.sub_differs,
                                        "past_due")
    await settle_subscription(api, temporal_client, stripe_fake, orgs.sub_agrees, "active")
    # (d) events: one never delivered (a minute old: on the second page, newest first), one
    # delivered, one too old, one of an unhandled type.
    missed = event("payment_intent.succeeded",
                   payment_intent(pi=new_id("pi"), meta=metadata(orgs.missed, PACK)),
                   created=int(time.time()) - 60)
    delivered = event("payment_intent.succeeded",
                      payment_intent(pi=new_id("pi"), meta=metadata(orgs.delivered, PACK)))
    old = event("payment_intent.succeeded",
                payment_intent(pi=new_id("pi"), meta=metadata(orgs.missed, PACK)),
                created=int(time.time()) - 73 * 3600)
    unhandled = event("customer.created", {"id": new_id("cus"), "object": "customer"})
    assert (await deliver(api, delivered)).json()["status"] == "started"
    await temporal_client.get_workflow_handle(f"stripe-{delivered['id']}").result()
    stripe_fake.events.extend([old, delivered, missed, unhandled])
    mine = {e["id"] for e in (old, delivered, missed, unhandled)}

    # One page per run, one event per page: the sweep pages through the events and continues
    # as new between pages, carrying its report.
    workflow_id = f"reconcile-test-{uuid.uuid4().hex[:8]}"
    counted_before = divergences_counted()
    handle = await temporal_client.start_workflow(
        ReconcileWorkflow.run, ReconcileInput(pages_per_run=1, events_page_size=1), id=workflow_id,
        task_queue=stripe_runtime.settings.temporal_task_queue)
    report = await handle.result()
    latest_run = await temporal_client.get_workflow_handle(workflow_id).describe()
    assert latest_run.run_id != handle.first_execution_run_id
    assert divergences_counted() - counted_before == Counter(d.check for d in report.divergences)

    assert of(report, orgs.balance_off) == [
        ("ledger", "balance_vs_entries", 500, 507), ("ledger", "balance_vs_lots", 500, 507)]
    assert of(report, orgs.lot_off) == [
        ("ledger", "balance_vs_lots", 400, 500), ("ledger", "lot_remaining", 500, 400)]
    assert of(report, orgs.gap_600) == [("meter", "overflow_vs_debits", 99400, 100000)]
    assert of(report, orgs.gap_400) == []
    assert of(report, orgs.sub_differs) == [("subscription", "status", "past_due", "active")]
    assert [d.subject for d in report.divergences if d.org_id == orgs.sub_differs] == [differs]
    assert of(report, orgs.sub_agrees) == []
    assert of(report, orgs.missed) == of(report, orgs.delivered) == []
    assert report.counts.orgs >= len(orgs.all()) - 1  # the missed event creates its org
    assert report.counts.subscriptions_checked >= 2
    assert report.counts.events_listed >= 2 and report.counts.events_missed >= 1
    assert [(r.event_id, r.outcome) for r in report.repaired_events if r.event_id in mine] == [
        (missed["id"], "applied")]
    assert await topups(db, orgs.missed) == 1
    assert (await db.accounts.find_one({"_id": orgs.missed}) or {})["balance"] == 500000
    stored = await db.reports.find_one({"_id": workflow_id})
    assert stored is not None and stored["counts"] == report.counts.model_dump()
    first_notes = await notifications(db, orgs.balance_off)
    assert [n["payload"]["check"] for n in first_notes] == ["ledger"]
    raised = Counter([n["payload"]["check"] for org in orgs.all()
                      for n in await notifications(db, org)])
    assert raised == {"ledger": 2, "meter": 1, "subscription": 1}

    # A second run, from the CLI: the repaired event is applied already and is left alone, the
    # divergences are still reported, and the day's notifications are not raised again.
    result = await billing(
        "reconcile", "--now", "--json", timeout=120, env={
            "TEMPORAL_ADDRESS": temporal_client.service_client.config.target_host,
            "TEMPORAL_TASK_QUEUE": stripe_runtime.settings.temporal_task_queue})
    assert result.code == 0, result.err
    again = ReconcileReport.model_validate(json.loads(result.out))
    assert again.report_id.startswith("reconcile-manual-")
    assert not [r for r in again.repaired_events if r.event_id in mine]
    assert of(again, orgs.balance_off) == of(report, orgs.balance_off)
    assert await topups(db, orgs.missed) == 1
    assert (await db.accounts.find_one({"_id": orgs.missed}) or {})["balance"] == 500000
    assert await notifications(db, orgs.balance_off) == first_notes
    latest = await ReconcileStore(db).latest_report()
    assert latest is not None
    assert (latest.report_id, latest.counts) == (again.report_id, again.counts)


async def test_stripe_refusing_leaves_the_ledger_checks_reported(
    stripe_worker: Any, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, db: Database, config: BillingConfig,
    api: httpx.AsyncClient,
) -> None:
    broken = new_org("broken")
    await Accounts(db, config).register(broken, utcnow())
    await db.accounts.update_one({"_id": broken}, {"$inc": {"balance": -3}})
    await settle_subscription(api, temporal_client, stripe_fake, new_org("sub"), "active")

    stripe_fake.fail_with = 400
    try:
        report = await temporal_client.execute_workflow(
            ReconcileWorkflow.run, id=f"reconcile-test-{uuid.uuid4().hex[:8]}",
            task_queue=stripe_runtime.settings.temporal_task_queue)
    finally:
        stripe_fake.fail_with = None

    assert of(report, broken) == [
        ("ledger", "balance_vs_entries", 500, 497), ("ledger", "balance_vs_lots", 500, 497)]
    assert report.counts.subscriptions_unverified >= 1
    assert report.events_error is not None and "Stripe refused" in report.events_error
    assert await db.reports.find_one({"_id": report.report_id}) is not None


async def test_cli_prints_the_latest_report(
    db: Database, stripe_runtime: Runtime, org: str
) -> None:
    report = ReconcileReport(
        report_id=f"reconcile-test-{uuid.uuid4().hex[:8]}", started_at=utcnow(),
        finished_at=utcnow(), week="2026-W19", events_since=utcnow(),
        counts=ReconcileCounts(orgs=3, ledger_divergent=1, events_listed=4, events_missed=1,
                               events_repaired=1),
        divergences=[Divergence(org_id=org, check="ledger", kind="balance_vs_entries",
                                subject="balance", expected=500, actual=507)],
        divergences_total=1,
        repaired_events=[RepairedEvent(event_id="evt_cli_1", type="invoice.paid",
                                       outcome="applied")],
    )
    store = ReconcileStore(db)
    await store.write_report(report)
    env = {"MONGODB_URI": stripe_runtime.settings.mongodb_uri,
           "MONGODB_DB": stripe_runtime.settings.mongodb_db}
    try:
        result = await billing("reconcile", env=env)
    finally:
        await db.reports.delete_one({"_id": report.report_id})

    assert result.code == 0, result.err
    assert report.report_id in result.out
    assert org in result.out and "balance_vs_entries" in result.out
    assert "evt_cli_1" in result.out
    assert "1 repaired" in result.out
