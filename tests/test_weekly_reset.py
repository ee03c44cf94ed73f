"""The weekly reset (SPEC §5.3): usage debt settled once, even when run five times at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from ledger_ops import clawback
from meter_helpers import put_on_plan, unregistered, usage
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy

from activities.reset import ResetActivities
from billing.config import BillingConfig, Settings
from billing.ledger import EntryKind
from billing.models import ResetOrg, WeeklyResetInput, WeeklyResetResult
from billing.runtime import Runtime
from billing.store.accounts import Accounts
from billing.store.database import Database, Doc
from billing.store.documents import LotTerms
from billing.store.ledger import Ledger
from billing.store.meters import Meters
from billing.weeks import iso_week, next_week, week_start
from starter.schedules import SCHEDULES
from worker import build_worker
from workflows.search import ORG_ID
from workflows.weekly_reset import WeeklyResetWorkflow, reset_workflow_id


async def _settlements(db: Database, org: str) -> list[Doc]:
    return [doc async for doc in db.ledger.find({"org_id": org, "kind": "settlement"})]


async def _org_in_debt(meters: Meters, accounts: Accounts, org: str, now: datetime) -> None:
    """An organization on the 100-unit plan that overflowed by 30 units this week."""
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    await meters.record(usage(org, "r1", units=130), now)


@pytest.fixture
def reset_runtime(runtime: Runtime, meter_config: BillingConfig) -> Runtime:
    return Runtime(settings=runtime.settings, config=meter_config, db=runtime.db)


async def test_debt_is_settled_once_under_five_concurrent_resets(
    reset_runtime: Runtime, accounts, db, org, now
):
    meters = Meters(db, reset_runtime.config)
    await _org_in_debt(meters, accounts, org, now)
    assert (await accounts.get(org))["balance"] == -30
    week = next_week(iso_week(now))
    monday = week_start(week)
    activities = ResetActivities(reset_runtime)
    results = await asyncio.gather(*[
        activities.weekly_reset_org(ResetOrg(org_id=org, week=week, now=monday))
        for _ in range(5)
    ])
    assert sum(r.applied for r in results) == 1
    assert {(r.settled, r.used, r.quota) for r in results} == {(30, 30, 100)}
    settlements = await _settlements(db, org)
    assert [(s["amount"], s["key"]) for s in settlements] == [(30, f"settle:{week}")]
    account = await accounts.get(org)
    assert (account["balance"], account["usage_debt"]) == (0, 0)
    view = await meters.current(org, monday + timedelta(hours=1))
    assert (view.week, view.used, view.quota, view.plan_id) == (week, 30, 100, "tiny")
    old = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
    assert old is not None and old["archived_at"] == monday and old["used"] == 130
    # the new week goes on from the settled 30 units
    after = await meters.record(usage(org, "r2", units=80), monday + timedelta(hours=2))
    assert (after.used, after.overflow) == (110, 10)


async def test_debt_caused_by_a_refund_is_not_settled(
    reset_runtime: Runtime, accounts, db, org, now
):
    meters = Meters(db, reset_runtime.config)
    ledger = Ledger(db)
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    bought = await ledger.write(
        org, key="payment:pi_r", kind=EntryKind.TOPUP, amount=1000, now=now,
        terms=LotTerms(payment_intent=f"pi_r-{org}", charge=f"ch_r-{org}", price_cents=1000))
    assert bought.entry is not None
    await meters.record(usage(org, "r1", units=1130), now)  # overflow 1030: lot used, debt 30
    await clawback(ledger, org, key="refund:re_1", kind=EntryKind.REFUND,
                          lot_ids=[bought.entry["lot_id"]], cents=1000, now=now)
    account = await accounts.get(org)
    assert (account["balance"], account["usage_debt"], account["other_debt"]) == (-1030, 30, 1000)
    week = next_week(iso_week(now))
    result = await ResetActivities(reset_runtime).weekly_reset_org(
        ResetOrg(org_id=org, week=week, now=week_start(week)))
    assert (result.applied, result.settled, result.used) == (True, 30, 30)
    account = await accounts.get(org)
    assert (account["balance"], account["usage_debt"], account["other_debt"]) == (-1000, 0, 1000)


async def test_quota_zero_plan_and_no_debt_settle_nothing(
    reset_runtime: Runtime, accounts, db, org, now
):
    meters = Meters(db, reset_runtime.config)
    await accounts.register(org, now)
    await meters.record(usage(org, "r1", units=700), now)  # free plan: balance -200
    week = next_week(iso_week(now))
    result = await ResetActivities(reset_runtime).weekly_reset_org(
        ResetOrg(org_id=org, week=week, now=week_start(week)))
    assert (result.applied, result.settled, result.used, result.quota) == (True, 0, 0, 0)
    assert await _settlements(db, org) == []
    assert (await accounts.get(org))["balance"] == -200


def test_weekly_reset_schedule_is_monday_midnight_utc() -> None:
    [definition] = [s for s in SCHEDULES if s.id == "weekly-reset"]
    assert definition.workflow == WeeklyResetWorkflow.__name__
    [calendar] = definition.spec().calendars
    assert [r.start for r in calendar.day_of_week] == [1]
    assert ([r.start for r in calendar.hour], [r.start for r in calendar.minute]) == ([0], [0])


@pytest.fixture
async def sweep_env(
    temporal_client: Client, mongo_uri: str, meter_config: BillingConfig
) -> AsyncIterator[tuple[Runtime, str]]:
    """A worker of its own on a database of its own, so a sweep sees only this test's orgs."""
    name = f"billing_reset_{uuid.uuid4().hex[:8]}"
    settings = Settings(mongodb_uri=mongo_uri, mongodb_db=name,
                        temporal_task_queue=f"reset-{uuid.uuid4().hex[:8]}")
    runtime = Runtime(settings=settings, config=meter_config, db=Database(mongo_uri, name))
    await runtime.db.ensure_indexes()
    async with build_worker(temporal_client, runtime):
        yield runtime, settings.temporal_task_queue
    await runtime.db.client.drop_database(name)
    await runtime.db.close()


async def test_sweep_workflow_five_times_at_once(sweep_env, temporal_client: Client, now):
    runtime, task_queue = sweep_env
    db = runtime.db
    meters = Meters(db, runtime.config)
    accounts = Accounts(db, runtime.config)
    tag = uuid.uuid4().hex[:6]
    in_debt = [f"debt-{tag}-{i}" for i in range(3)]
    for org in in_debt:
        await _org_in_debt(meters, accounts, org, now)
    idle = f"idle-{tag}"
    await unregistered(accounts, idle, now)  # no meter, no subscription: not swept
    subscribed = f"sub-{tag}"
    await unregistered(accounts, subscribed, now)
    await db.subscriptions.insert_one({"_id": subscribed, "status": "active"})
    week = next_week(iso_week(now))
    # page size 2, one page per run: the sweep continues as new twice
    params = WeeklyResetInput(week=week, page_size=2, pages_per_run=1, concurrency=2)
    results = await asyncio.gather(*[
        temporal_client.execute_workflow(
            WeeklyResetWorkflow.run, params, id=f"weekly-reset-test-{tag}-{i}",
            task_queue=task_queue, result_type=WeeklyResetResult,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE)
        for i in range(5)
    ])
    assert sum(r.orgs for r in results) == 4  # each swept org reset by exactly one sweep
    assert sum(r.settled_units for r in results) == 90
    assert all(r.failed == [] and r.week == week for r in results)
    for org in in_debt:
        settlements = await _settlements(db, org)
        assert [s["amount"] for s in settlements] == [30]
        assert (await accounts.get(org))["balance"] == 0
        child = await temporal_client.get_workflow_handle(reset_workflow_id(org, week)).describe()
        assert child.typed_search_attributes.get(ORG_ID) == org
    assert await db.meters.count_documents({"org_id": idle}) == 0
    sub_meter = await db.meters.find_one({"org_id": subscribed, "week": week})
    assert sub_meter is not None and sub_meter["used"] == 0 and sub_meter["reset_at"] is not None
    history = await temporal_client.get_workflow_handle(f"weekly-reset-test-{tag}-0").describe()
    assert history.run_id != history.raw_description.workflow_execution_info.first_run_id
