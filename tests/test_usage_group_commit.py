"""Group commit of usage records (`Meters.record`): concurrent records share one transaction, a
record that fails leaves its neighbours applied, and an aborted commit applies nothing twice."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

import pytest
from faults import fail_point
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_checks import assert_consistent
from meter_helpers import put_on_plan, usage
from pymongo import monitoring

from billing.config import BillingConfig
from billing.errors import OrgNotFound
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.meter_writes import UsageResult
from billing.store.meters import Meters
from billing.weeks import iso_week

APP = "billing-group-commit-tests"


class Commits(monitoring.CommandListener):
    """Counts the transactions a client committed, and every command it sent."""

    def __init__(self) -> None:
        self.count = 0
        self.commands = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands += 1
        if event.command_name == "commitTransaction":
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def counted(mongo_uri: str, db: Database) -> AsyncIterator[tuple[Database, Commits]]:
    commits = Commits()
    own = Database(mongo_uri, db.db.name, appname=APP, event_listeners=[commits])
    yield own, commits
    await own.close()


async def registered(accounts: Accounts, now: datetime, count: int, *,
                     on: tuple[Meters, str] | None = None) -> list[str]:
    """`count` new organizations, on the default plan or `on`'s (meters, plan id)."""
    orgs = [f"org_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for org in orgs:
        await accounts.register(org, now)
        if on is not None:
            await put_on_plan(on[0], org, on[1], now)
    return orgs


async def test_concurrent_records_of_many_orgs_share_transactions_and_each_applies_once(
    counted: tuple[Database, Commits], meter_config: BillingConfig, accounts: Accounts,
    db: Database, now: datetime,
) -> None:
    own, commits = counted
    meters = Meters(own, meter_config)
    orgs = await registered(accounts, now, 20, on=(meters, "pro"))  # within quota: bulk path
    requests = [usage(org, f"run{i}", units=100) for i in range(10) for org in orgs]
    commits.count = commits.commands = 0
    results = await asyncio.gather(*(meters.record(r, now) for r in requests))
    assert all(r.applied for r in results)
    assert commits.count < len(requests) / 5, commits.count  # grouped, not one per record
    # written in bulk: a record applied alone takes at least four commands
    assert commits.commands < len(requests), commits.commands
    for org in orgs:
        meter = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
        assert meter is not None and meter["used"] == 1000
        assert await db.usage.count_documents({"org_id": org}) == 10
        await assert_consistent(db, org)


async def test_a_lone_record_commits_at_once(
    counted: tuple[Database, Commits], meter_config: BillingConfig, accounts: Accounts,
    now: datetime,
) -> None:
    own, commits = counted
    meters = Meters(own, meter_config)
    [org] = await registered(accounts, now, 1)
    result = await asyncio.wait_for(meters.record(usage(org, "alone", units=5), now), 10)
    assert (result.applied, result.used, commits.count) == (True, 5, 1)


async def test_failing_records_do_not_fail_their_neighbours(
    meter_config: BillingConfig, accounts: Accounts, db: Database, now: datetime,
) -> None:
    """One group holds an unknown organization, a replay of a record already applied, the same
    record twice, and good records: each good one applies once, the replay and the second copy
    answer the first result, the unknown organization its error."""
    meters = Meters(db, meter_config)
    orgs = await registered(accounts, now, 5, on=(meters, "pro"))
    first = await meters.record(usage(orgs[0], "seen", units=7), now)
    unknown = f"org_{uuid.uuid4().hex[:10]}"
    requests = [usage(org, "good", units=3) for org in orgs]
    requests[2:2] = [usage(unknown, "x", units=1), usage(orgs[0], "seen", units=999),
                     usage(orgs[1], "twice", units=4), usage(orgs[1], "twice", units=4)]
    answers = await meters.record_many(requests, now)
    assert isinstance(answers[2], OrgNotFound)
    replay = answers[3]
    assert isinstance(replay, UsageResult) and not replay.applied
    assert (replay.units, replay.used) == (first.units, first.used)
    twice = [answers[4], answers[5]]
    assert all(isinstance(a, UsageResult) for a in twice)
    assert sorted(a.applied for a in twice if isinstance(a, UsageResult)) == [False, True]
    good = [a for i, a in enumerate(answers) if i not in (2, 3, 4, 5)]
    assert all(isinstance(a, UsageResult) and a.applied for a in good)
    assert await db.meters.count_documents({"org_id": unknown}) == 0
    assert await db.usage.count_documents({"org_id": orgs[0]}) == 2
    assert await db.usage.count_documents({"org_id": orgs[1]}) == 2
    used = {m["org_id"]: m["used"] async for m in db.meters.find({"org_id": {"$in": orgs}})}
    assert used == {orgs[0]: 10, orgs[1]: 7, **{org: 3 for org in orgs[2:]}}
    for org in orgs:
        await assert_consistent(db, org)


@pytest.mark.parametrize("fault", ["dropped-commit", "transient-abort"])
async def test_an_aborted_group_commit_applies_every_record_exactly_once(
    counted: tuple[Database, Commits], meter_config: BillingConfig, accounts: Accounts,
    db: Database, now: datetime, fault: str,
) -> None:
    """The commit of a group fails (the connection drops during `commitTransaction`, or the
    server aborts it as transient): the group is retried as a whole and every record of it,
    overflowing ones included, is counted, debited and alerted once."""
    own, _ = counted
    meters = Meters(own, meter_config)
    orgs = await registered(accounts, now, 4, on=(meters, "tiny"))  # a weekly quota of 100
    options = ({"close_connection": True} if fault == "dropped-commit"
               else {"error_code": 112, "error_labels": ["TransientTransactionError"]})
    requests = [usage(org, f"run{i}", units=30) for i in range(5) for org in orgs]
    async with fail_point(db, app_name=APP, commands=["commitTransaction"], times=2, **options):
        results = await asyncio.gather(*(meters.record(r, now) for r in requests))
    assert all(r.applied for r in results)
    for org in orgs:
        meter = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
        assert meter is not None and meter["used"] == 150
        keys = Counter([e["key"] async for e in db.ledger.find({"org_id": org})])
        assert all(n == 1 for n in keys.values()), keys
        assert await db.usage.count_documents({"org_id": org}) == 5
        alerts = [n["payload"]["threshold"] async for n in db.notifications.find(
            {"org_id": org, "type": "meter.threshold_crossed"})]
        assert sorted(alerts) == [80, 100]
        account = await assert_consistent(db, org)
        assert account["balance"] == 500 - 50  # the signup grant less the overflow


async def test_a_group_the_server_refuses_fails_every_caller_and_writes_nothing(
    counted: tuple[Database, Commits], meter_config: BillingConfig, accounts: Accounts,
    db: Database, now: datetime,
) -> None:
    """A commit refused for good (not transient) fails each record of the group, visibly, and
    writes none of them; sent again, each applies once."""
    own, _ = counted
    meters = Meters(own, meter_config)
    orgs = await registered(accounts, now, 3)
    requests = [usage(org, "r", units=2) for org in orgs]
    async with fail_point(db, app_name=APP, commands=["commitTransaction"], times=1,
                          error_code=2):
        first = await asyncio.gather(*(meters.record(r, now) for r in requests),
                                     return_exceptions=True)
    failed = [r for r in first if isinstance(r, Exception)]
    assert failed, first
    assert await db.usage.count_documents({"org_id": {"$in": orgs}}) == len(first) - len(failed)
    again = await asyncio.gather(*(meters.record(r, now) for r in requests))
    assert sum(r.applied for r in again) == len(failed)
    for org in orgs:
        assert await db.usage.count_documents({"org_id": org}) == 1
        await assert_consistent(db, org)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(1, 60)),
                     min_size=1, max_size=50))
async def test_any_mix_of_records_and_repeats_counts_each_key_once(
    meter_config: BillingConfig, accounts: Accounts, db: Database, now: datetime,
    plan: list[tuple[int, int, int]],
) -> None:
    """Records of three organizations on a quota of 100 (so some apply in bulk, some cross a
    threshold or overflow), keys repeated in any order, all sent at once: each `(org, run)` is
    counted once with the units of its first copy, later copies answer that first result, and
    the ledger invariants hold."""
    meters = Meters(db, meter_config)
    orgs = await registered(accounts, now, 3, on=(meters, "tiny"))
    answers = await asyncio.gather(*(
        meters.record(usage(orgs[o], f"run{r}", units=n), now) for o, r, n in plan))
    first: dict[tuple[int, int], int] = {}
    for index, (o, r, _) in enumerate(plan):
        first.setdefault((o, r), index)
    assert [a.applied for a in answers] == [first[(o, r)] == i for i, (o, r, _) in enumerate(plan)]
    for index, (o, r, _) in enumerate(plan):
        assert answers[index].used == answers[first[(o, r)]].used
    applied = [(o, r, plan[i][2]) for (o, r), i in first.items()]
    for index, org in enumerate(orgs):
        expected = sum(units for o, _, units in applied if o == index)
        meter = await db.meters.find_one({"org_id": org, "week": iso_week(now)})
        assert (meter["used"] if meter else 0) == expected
        await assert_consistent(db, org)


async def test_overflow_of_many_orgs_is_debited_in_bulk_exactly_as_one_by_one(
    counted: tuple[Database, Commits], meter_config: BillingConfig, accounts: Accounts,
    db: Database, now: datetime,
) -> None:
    """Organizations on the free plan (no quota, a signup grant of 500 units): every record
    debits the ledger. Sent all at once, the debits are written in bulk, and each record still
    sees the balance the records of its organization before it left: the grant lot drawn down,
    then usage debt, each grant alert raised once, every entry with its own `seq`."""
    own, commits = counted
    meters = Meters(own, meter_config)
    orgs = await registered(accounts, now, 20)
    for org in orgs:  # opens the week's meter: 500 -> 490
        await meters.record(usage(org, "open", units=10), now)

    small = [usage(org, f"small{i}", units=10) for i in range(10) for org in orgs]
    commits.count = commits.commands = 0
    results = await asyncio.gather(*(meters.record(r, now) for r in small))
    # no alert on the way (490 -> 390): all in bulk, where a debit alone takes nine commands
    assert commits.commands < len(small), commits.commands
    for org in orgs:
        mine = [r for q, r in zip(small, results, strict=True) if q.org_id == org]
        assert [(r.applied, r.overflow, r.balance) for r in mine] == [
            (True, 10, 490 - 10 * k) for k in range(1, 11)]

    # 390 -> -210: below 20 % of the grant, below 0, then usage debt
    large = [usage(org, f"large{i}", units=60) for i in range(10) for org in orgs]
    results = await asyncio.gather(*(meters.record(r, now) for r in large))
    for org in orgs:
        mine = [r for q, r in zip(large, results, strict=True) if q.org_id == org]
        assert [(r.applied, r.overflow, r.balance) for r in mine] == [
            (True, 60, 390 - 60 * k) for k in range(1, 11)]
        account = await assert_consistent(db, org)
        assert (account["balance"], account["usage_debt"]) == (-210, 210)
        entries = [e async for e in db.ledger.find({"org_id": org})]
        assert len({e["seq"] for e in entries}) == len(entries) == 22
        assert sorted(e["key"] for e in entries if e["kind"] == "debit") == sorted(
            [f"usage:{run}:initial" for run in ("open", *(f"small{i}" for i in range(10)),
                                                *(f"large{i}" for i in range(10)))])
        alerts = [n["payload"]["threshold"] async for n in db.notifications.find(
            {"org_id": org, "type": "extras.balance_threshold_crossed"})]
        assert sorted(alerts) == [0, 20]


async def test_a_batch_sent_again_is_answered_in_one_group_not_one_transaction_each(
    counted: tuple[Database, Commits], meter_config: BillingConfig, accounts: Accounts,
    now: datetime,
) -> None:
    """A client that sends a whole batch again gets every first result back, with a repeated
    key inside the batch answered like a replay, and the engine does it in a few transactions:
    the group reads its stored records up front once a duplicate shows."""
    own, commits = counted
    meters = Meters(own, meter_config)
    orgs = await registered(accounts, now, 10, on=(meters, "pro"))
    batch = [usage(org, f"run{i}", units=i % 7) for i in range(30) for org in orgs]
    first = await meters.record_many(batch + batch[:5], now)
    assert [getattr(r, "applied", None) for r in first] == [True] * 300 + [False] * 5
    assert first[300:] == [replace(r, applied=False) for r in first[:5]]

    commits.count = commits.commands = 0
    again = await meters.record_many(batch, now)
    assert again == [replace(r, applied=False) for r in first[:300]]
    # one attempt that meets a duplicate, one that reads the stored records: not 300 of each
    assert commits.commands < 30, commits.commands
