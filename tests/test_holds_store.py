"""Balance holds inside one group commit (real database): holds and records of one group are
decided in arrival order, each seeing what the ones before it did."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from meter_helpers import usage

from billing.config import BillingConfig
from billing.errors import OrgNotFound
from billing.holds import INSUFFICIENT_UNITS, Hold, HoldRequest, Refusal
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.holds import release
from billing.store.meters import Meters


@pytest.fixture
def meters(db: Database, meter_config: BillingConfig) -> Meters:
    return Meters(db, meter_config)


def ask(hold_id: str, units: int, ttl_seconds: int = 900) -> HoldRequest:
    return HoldRequest(hold_id=hold_id, units=units, ttl_seconds=ttl_seconds)


async def test_a_group_decides_holds_and_records_in_arrival_order(
    meters: Meters, accounts: Accounts, db: Database, org: str, now: datetime
) -> None:
    await accounts.register(org, now)  # 500 remaining
    # queued together before the committer runs: one group, in this order
    results = await asyncio.gather(
        meters.hold(org, ask("a", 300), now),
        meters.hold(org, ask("b", 250), now),  # 200 left: refused
        meters.record(usage(org, "run-a", units=100, hold_id="a"), now),  # frees a's 300
        meters.hold(org, ask("c", 250), now),  # 400 left now
        meters.hold(org, ask("a", 1), now),  # a repeated id answers its first hold
    )
    a, refused, record, b, again = results
    assert isinstance(a, Hold) and a.remaining == 200
    assert refused == Refusal(INSUFFICIENT_UNITS, 200)
    assert record.applied and record.balance == 400
    assert isinstance(b, Hold) and b.remaining == 150
    assert again == a
    gate = await meters.gate(org, now)
    assert (gate.held, gate.remaining) == (250, 150)
    assert await db.holds.count_documents({"org_id": org}) == 2
    meter = await db.meters.find_one({"org_id": org})
    assert [h["hold_id"] for h in meter["holds"]] == ["c"]  # a's settlement took it off


async def test_a_hold_of_an_unknown_organization_fails_alone(
    meters: Meters, accounts: Accounts, org: str, now: datetime
) -> None:
    await accounts.register(org, now)
    results = await asyncio.gather(
        meters.hold(org, ask("a", 100), now),
        meters.hold(f"{org}-unknown", ask("a", 100), now),
        meters.hold(org, ask("b", 100), now),
        return_exceptions=True,
    )
    assert isinstance(results[0], Hold) and isinstance(results[2], Hold)
    assert isinstance(results[1], OrgNotFound)
    assert (await meters.gate(org, now)).held == 200


async def test_an_expired_hold_stops_counting_without_any_write(
    meters: Meters, accounts: Accounts, db: Database, org: str, now: datetime
) -> None:
    await accounts.register(org, now)
    hold = await meters.hold(org, ask("a", 500, ttl_seconds=60), now)
    assert isinstance(hold, Hold) and hold.expires_at == now + timedelta(seconds=60)
    assert (await meters.gate(org, now + timedelta(seconds=59))).remaining == 0
    stored = await db.holds.find_one({"_id": f"{org}/a"})
    later = now + timedelta(seconds=60)
    assert (await meters.gate(org, later)).remaining == 500
    granted = await meters.hold(org, ask("b", 500), later)
    assert isinstance(granted, Hold)
    # settling the expired hold changes nothing: it stays as it was stored
    assert (await meters.record(usage(org, "late", units=5, hold_id="a"), later)).applied
    assert await db.holds.find_one({"_id": f"{org}/a"}) == stored


async def test_a_hold_of_last_week_counts_and_settles_on_its_own_meter(
    meters: Meters, accounts: Accounts, db: Database, org: str
) -> None:
    """A hold is kept on the meter of the week it is granted in: one granted late on a Sunday
    still counts on Monday, and settling or releasing it then writes last week's meter."""
    sunday = datetime(2026, 5, 10, 23, 0, tzinfo=UTC)  # 2026-W19
    monday = sunday + timedelta(minutes=90)  # 2026-W20
    await accounts.register(org, sunday)  # 500 remaining
    for hold_id, units in (("a", 300), ("b", 100)):
        assert isinstance(await meters.hold(org, ask(hold_id, units, 7200), sunday), Hold)
    assert (await meters.gate(org, monday)).held == 400
    assert await meters.hold(org, ask("c", 150), monday) == Refusal(INSUFFICIENT_UNITS, 100)

    assert (await meters.record(usage(org, "a", units=10, hold_id="a"), monday)).applied
    assert await release(db, org, "b", monday)
    assert not await release(db, org, "b", monday)
    assert (await meters.gate(org, monday)).held == 0
    weeks = {doc["week"]: doc async for doc in db.meters.find({"org_id": org})}
    assert weeks["2026-W19"]["holds"] == [] and weeks["2026-W20"]["used"] == 10
    granted = await meters.hold(org, ask("c", 150), monday)
    assert isinstance(granted, Hold) and granted.remaining == 490 - 150


async def test_expired_holds_leave_the_meter_when_it_is_written_anyway(
    meters: Meters, accounts: Accounts, db: Database, org: str, now: datetime
) -> None:
    await accounts.register(org, now)
    await meters.hold(org, ask("short", 10, ttl_seconds=60), now)
    await meters.hold(org, ask("long", 20), now)
    assert (await meters.record(usage(org, "r", units=1), now + timedelta(seconds=60))).applied
    meter = await db.meters.find_one({"org_id": org})
    assert [h["hold_id"] for h in meter["holds"]] == ["long"]
    assert (await meters.gate(org, now + timedelta(seconds=60))).held == 20
