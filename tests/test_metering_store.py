"""Recording usage on the real server: one transaction per record, exact under concurrency."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta

import pytest
from bson import ObjectId
from meter_helpers import put_on_plan, subscribed, unregistered, usage

from billing.config import BillingConfig
from billing.metering import METER_EXHAUSTED, PAYMENT_PAST_DUE
from billing.store.accounts import Accounts
from billing.store.database import LEGACY_USAGE_KEY, Database, Doc
from billing.store.meter_writes import usage_id
from billing.store.meters import Meters
from billing.store.transactions import run_in_transaction
from billing.weeks import iso_week


@pytest.fixture
def meters(db: Database, meter_config: BillingConfig) -> Meters:
    return Meters(db, meter_config)


async def notes(db: Database, org: str, type: str | None = None) -> list[Doc]:
    query: Doc = {"org_id": org} if type is None else {"org_id": org, "type": type}
    return [doc async for doc in db.notifications.find(query)]


async def debits(db: Database, org: str) -> list[Doc]:
    return [doc async for doc in db.ledger.find({"org_id": org, "kind": "debit"})]


async def test_overflow_past_quota_debits_and_alerts_once(meters, accounts, db, org, now):
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    first = await meters.record(usage(org, "r1", units=90), now)
    assert (first.applied, first.used, first.overflow, first.quota) == (True, 90, 0, 100)
    second = await meters.record(usage(org, "r2", units=30), now)
    assert (second.used, second.overflow, second.balance) == (120, 20, -20)
    assert second.week == iso_week(now)
    assert [d["amount"] for d in await debits(db, org)] == [-20]
    assert (await debits(db, org))[0]["key"] == "usage:r2:initial"
    alerts = await notes(db, org, "meter.threshold_crossed")
    assert sorted(a["payload"]["threshold"] for a in alerts) == [80, 100]
    await meters.record(usage(org, "r3", units=50), now)
    assert len(await notes(db, org, "meter.threshold_crossed")) == 2
    account = await accounts.get(org)
    assert account["balance"] == -70 and account["usage_debt"] == 70


async def test_200_concurrent_records_around_the_threshold(
    meters, meter_config, accounts, db, org, now
):
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    sizes = [random.randint(0, 2) for _ in range(200)]
    # half through one instance (queued in process), half as if each came from its own process
    # (only the transactions keep them apart)
    results = await asyncio.gather(*[
        (meters if i % 2 else Meters(db, meter_config)).record(usage(org, f"run{i}", units=n), now)
        for i, n in enumerate(sizes)
    ])
    total = sum(sizes)
    assert all(r.applied for r in results)
    meter = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
    assert meter is not None and meter["used"] == total
    # serializable: every record that counted units saw its own running total
    counted = [r.used for r in results if r.units > 0]
    assert len(set(counted)) == len(counted) and max(r.used for r in results) == total
    assert sum(r.overflow for r in results) == total - 100
    assert sum(d["amount"] for d in await debits(db, org)) == -(total - 100)
    assert (await accounts.get(org))["balance"] == -(total - 100)
    alerts = await notes(db, org, "meter.threshold_crossed")
    assert sorted(a["payload"]["threshold"] for a in alerts) == [80, 100]
    assert await db.usage.count_documents({"org_id": org}) == 200


async def test_quota_zero_plan_debits_every_unit(meters, accounts, db, org, now):
    await accounts.register(org, now)  # free plan, signup grant 500
    result = await meters.record(usage(org, "r1", costs={"llm": 0.1234}), now)
    assert (result.units, result.overflow, result.quota, result.balance) == (123, 123, 0, 377)
    zero = await meters.record(usage(org, "r2", costs={"llm": 0}), now)
    assert (zero.applied, zero.units, zero.overflow, zero.balance) == (True, 0, 0, 377)
    stored = await db.usage.find_one({"org_id": org, "run_id": "r2"})
    assert stored is not None and stored["result"] == "zero_cost"
    assert [d["amount"] for d in await debits(db, org)] == [-123]


async def test_signup_grant_alerts_at_20_and_0_percent(meters, accounts, db, org, now):
    await accounts.register(org, now)
    await meters.record(usage(org, "r1", units=350), now)  # 500 -> 150
    assert await notes(db, org, "extras.balance_threshold_crossed") == []
    await meters.record(usage(org, "r2", units=60), now)  # 150 -> 90: crosses 100 (20 %)
    await meters.record(usage(org, "r3", units=40), now)  # 90 -> 50
    await meters.record(usage(org, "r4", units=60), now)  # 50 -> -10: crosses 0
    await meters.record(usage(org, "r5", units=60), now)
    alerts = await notes(db, org, "extras.balance_threshold_crossed")
    assert sorted(a["payload"]["threshold"] for a in alerts) == [0, 20]


async def test_signup_grant_alert_is_the_deepest_crossing_only(meters, accounts, db, org, now):
    await accounts.register(org, now)
    await meters.record(usage(org, "r1", units=600), now)  # 500 -> -100 in one record
    alerts = await notes(db, org, "extras.balance_threshold_crossed")
    assert [a["payload"]["threshold"] for a in alerts] == [0]


async def test_runaway_alert_once_per_week(meters, accounts, db, org, now):
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    await meters.record(usage(org, "r1", units=600), now)  # balance -500
    assert await notes(db, org, "extras.runaway_debit") == []
    await meters.record(usage(org, "r2", units=600), now)  # -1100 < -10 * 100
    await meters.record(usage(org, "r3", units=600), now)
    runaway = await notes(db, org, "extras.runaway_debit")
    assert len(runaway) == 1 and runaway[0]["payload"]["balance"] == -1100


async def test_replay_returns_the_first_result_and_writes_nothing(meters, accounts, db, org, now):
    await accounts.register(org, now)
    first = await meters.record(usage(org, "r1", step="s:1", units=70), now)
    ledger_before = await db.ledger.count_documents({"org_id": org})
    replay = await meters.record(usage(org, "r1", step="s:1", units=999), now + timedelta(hours=1))
    assert replay.applied is False
    assert (replay.units, replay.overflow, replay.used, replay.balance, replay.week) == (
        first.units, first.overflow, first.used, first.balance, first.week)
    assert await db.ledger.count_documents({"org_id": org}) == ledger_before
    meter = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
    assert meter is not None and meter["used"] == 70
    concurrent = await asyncio.gather(*[
        Meters(db, meters.config).record(usage(org, "r2", units=5), now) for _ in range(10)])
    assert sum(r.applied for r in concurrent) == 1
    assert {(r.used, r.balance) for r in concurrent} == {(75, 425)}
    assert await db.usage.count_documents({"org_id": org}) == 2


async def test_unknown_org_is_rejected_without_writes(meters, db, org, now):
    from billing.errors import OrgNotFound

    with pytest.raises(OrgNotFound):
        await meters.record(usage(org, "r1", units=1), now)
    assert await db.meters.count_documents({"org_id": org}) == 0


async def test_week_and_records_carry_the_plan_version(meters, accounts, db, org, now):
    await accounts.register(org, now)
    await put_on_plan(meters, org, "pro", now)
    result = await meters.record(usage(org, "r1", costs={"llm": 0.0123, "search": 0.002}), now)
    assert (result.units, result.quota) == (26, 500000)
    meter = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
    record = await db.usage.find_one({"org_id": org, "run_id": "r1"})
    assert meter is not None and record is not None
    assert (meter["plan_id"], meter["ratio_version"]) == ("pro", "2026.05")
    assert (record["plan_id"], record["ratio_version"]) == ("pro", "2026.05")
    assert record["breakdown"] == {"llm": 24, "search": 2}


async def test_paused_subscription_meters_on_the_default_plan(meters, accounts, db, org, now):
    await unregistered(accounts, org, now)
    await subscribed(db, meters.config, org, "paused", None, now)
    await put_on_plan(meters, org, "pro", now)
    result = await meters.record(usage(org, "r1", costs={"llm": 0.0123, "search": 0.002}), now)
    # free plan: ratio 1, quota 0 -> 12 + 2 units, all overflow
    assert (result.units, result.quota, result.overflow) == (14, 0, 14)
    view = await meters.current(org, now)
    assert (view.plan_id, view.used) == ("free", 14)


async def test_plan_change_keeps_usage_and_notifies_once(meters, accounts, db, org, now):
    await unregistered(accounts, org, now)
    assert await put_on_plan(meters, org, "pro", now)
    await meters.record(usage(org, "r1", units=400), now)
    later = now + timedelta(hours=1)
    assert await put_on_plan(meters, org, "tiny", later)
    assert not await put_on_plan(meters, org, "tiny", later + timedelta(minutes=1))
    view = await meters.current(org, later)
    assert (view.plan_id, view.quota, view.used, view.remaining) == ("tiny", 100, 400, 0)
    account = await accounts.get(org)
    assert account["plan_id"] == "tiny"
    changes = await notes(db, org, "plan.changed")
    assert sorted((c["payload"]["from"], c["payload"]["to"]) for c in changes) == [
        ("free", "pro"), ("pro", "tiny")]
    # the downgrade leaves the week over quota: both alerts, once
    alerts = await notes(db, org, "meter.threshold_crossed")
    assert sorted(a["payload"]["threshold"] for a in alerts) == [80, 100]
    after = await meters.record(usage(org, "r2", units=10), later)
    assert (after.used, after.overflow) == (410, 10)


async def test_deleted_subscription_resets_the_week(meters, accounts, db, org, now):
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    await meters.record(usage(org, "r1", units=60), now)
    removed = await run_in_transaction(
        db.client, lambda s: meters.reset_week_usage_in(s, org, now))
    assert removed == 60
    assert (await meters.current(org, now)).used == 0
    again = await run_in_transaction(
        db.client, lambda s: meters.reset_week_usage_in(s, org, now))
    assert again == 0


async def test_quota_gate(meters, accounts, db, org, now):
    await unregistered(accounts, org, now)
    await put_on_plan(meters, org, "tiny", now)
    gate = await meters.gate(org, now)
    assert (gate.allowed, gate.remaining, gate.reason) == (True, 100, None)
    await meters.record(usage(org, "r1", units=100), now)
    gate = await meters.gate(org, now)
    assert (gate.allowed, gate.remaining, gate.reason) == (False, 0, METER_EXHAUSTED)
    await subscribed(db, meters.config, org, "past_due", now - timedelta(days=8), now)
    await run_in_transaction(db.client, lambda s: meters.reset_week_usage_in(s, org, now))
    gate = await meters.gate(org, now)
    assert (gate.allowed, gate.remaining, gate.reason) == (False, 100, PAYMENT_PAST_DUE)
    await subscribed(db, meters.config, org, "past_due", now - timedelta(days=6), now)
    assert (await meters.gate(org, now)).allowed


async def test_a_record_stored_before_keys_became_ids_still_answers_its_replays(
    mongo_uri: str, meter_config: BillingConfig, org: str, now: datetime
) -> None:
    """A database from before usage keys were `_id`s holds records under an `ObjectId`, guarded
    by the unique `(org_id, run_id, step)` index it keeps: a replay of such a record (a client
    retrying across the upgrade) answers the stored result and counts nothing."""
    old = Database(mongo_uri, f"billing_legacy_{uuid.uuid4().hex[:8]}")
    try:
        await old.ensure_indexes()
        await old.usage.create_index([("org_id", 1), ("run_id", 1), ("step", 1)], unique=True,
                                     name=LEGACY_USAGE_KEY)
        meters = Meters(old, meter_config)
        await unregistered(Accounts(old, meter_config), org, now)
        await put_on_plan(meters, org, "tiny", now)
        first = await meters.record(usage(org, "new", units=5), now)
        written = await old.usage.find_one_and_delete({"_id": usage_id(usage(org, "new"))})
        assert written is not None
        await old.usage.insert_one({**written, "_id": ObjectId(), "run_id": "old"})

        replay = await meters.record(usage(org, "old", units=40), now)
        assert (replay.applied, replay.units, replay.used) == (False, 5, first.used)
        fresh = await meters.record(usage(org, "new", units=7), now)
        assert (fresh.applied, fresh.units, fresh.used) == (True, 7, 12)
        assert await old.usage.count_documents({"org_id": org}) == 2
    finally:
        await old.client.drop_database(old.db.name)
        await old.close()


async def test_a_new_database_keys_usage_records_by_id_alone(db: Database) -> None:
    """The idempotency key is the `_id`: no secondary unique index costs each insert a write."""
    indexes = await db.usage.index_information()
    assert [name for name, spec in indexes.items() if spec.get("unique")] == []
    assert LEGACY_USAGE_KEY not in indexes
