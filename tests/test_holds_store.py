"""Balance holds inside one group commit (real database): holds and records of one group are
decided in arrival order, each seeing what the ones before it did."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from meter_helpers import usage

from billing.config import BillingConfig
from billing.errors import OrgNotFound
from billing.holds import INSUFFICIENT_UNITS, Hold, HoldRequest, Refusal
from billing.store.accounts import Accounts
from billing.store.database import Database
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
    assert (await db.holds.find_one({"_id": f"{org}/a"}))["settled_by"] == f"{org}/run-a/initial"


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
