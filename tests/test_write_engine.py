"""The write engine (`billing/store/books.py`) has one planner: records applied one by one (each
a unit of work of one) and the same records sent all at once (shared group commits) leave the
same books: meters, balances, debts, entries, lots drawn and notifications."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_checks import assert_consistent, lots_of
from meter_helpers import put_on_plan, usage

from billing.config import BillingConfig
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.meters import Meters
from billing.weeks import iso_week

#: Each organization of a pair is on one of these: a quota of 100 (threshold alerts, then
#: overflow into the signup grant) or no quota (every unit debited: grant alerts, usage debt).
PLANS = ("tiny", "free")


async def books_of(db: Database, org: str, week: str) -> dict[str, Any]:
    """What the engine wrote for `org`, without the ids that differ between organizations."""
    account = await assert_consistent(db, org)
    meter = await db.meters.find_one({"org_id": org, "week": week}) or {}
    lots = {lot["_id"]: lot["seq"] async for lot in db.lots.find({"org_id": org})}
    entries = [(e["seq"], e["key"], e["kind"], e["amount"], e["balance_after"],
                e.get("debt_added", 0), [(lots[d["lot_id"]], d["units"]) for d in e.get(
                    "draws", [])]) async for e in db.ledger.find({"org_id": org}).sort("seq", 1)]
    notes = [(n["seq"], n["type"], n["key"], n["payload"])
             async for n in db.notifications.find({"org_id": org}, {"_id": 0}).sort("seq", 1)]
    return {
        "account": {k: account.get(k) for k in ("balance", "usage_debt", "other_debt", "seq",
                                                "notification_seq")},
        "meter": {k: meter.get(k) for k in ("used", "quota", "overflow", "runaway_alerted")},
        "lots": sorted((lot["seq"], lot["remaining"])
                       for lot in (await lots_of(db, account))[0].values()),
        "entries": entries,
        "notifications": notes,
    }


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.sampled_from(PLANS),
       records=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 160)), min_size=1,
                        max_size=25))
async def test_one_by_one_and_all_at_once_write_the_same_books(
    meter_config: BillingConfig, accounts: Accounts, db: Database, now: datetime,
    plan: str, records: list[tuple[int, int]],
) -> None:
    """`records` are (run, units); a run repeated is a replay. One organization gets them one
    after the other, each awaited; the other all at once."""
    meters = Meters(db, meter_config)
    alone, together = (f"org_{uuid.uuid4().hex[:10]}" for _ in range(2))
    for org in (alone, together):
        await accounts.register(org, now)
        await put_on_plan(meters, org, plan, now)
    answers_alone = [await meters.record(usage(alone, f"run{run}", units=units), now)
                     for run, units in records]
    answers_together = await asyncio.gather(*(
        meters.record(usage(together, f"run{run}", units=units), now) for run, units in records))
    assert answers_alone == answers_together
    week = iso_week(now)
    assert await books_of(db, alone, week) == await books_of(db, together, week)
