"""The group commit of usage records and balance holds (SPEC §5.2, §5.11).

Every record of an organization increments the same meter document, so concurrent transactions
on one organization conflict and start again. `GroupCommit` therefore commits the records and
holds of its process in groups, one transaction at a time: within a process they never
conflict, and a commit carries everything that arrived while the previous one committed
(transactions stay the guarantee across processes). A lone record is a group of one: there is
no other path.

A group is one unit of work on the write engine (`billing.store.books.Books`): the accounts,
meters and open lots it touches are read once, each member is decided in memory in arrival
order with the meter rules (`billing.store.meter_writes`), and everything is written in bulk.
Balance holds are kept on the meters (`billing.store.holds`): a grant costs the group its
organization's meter write (one per organization and group, shared with its records) and the
hold's record in `holds`; a settlement costs the record nothing beyond its own meter write.
A usage record's `_id` is its idempotency key, so a replay stored before makes the insert fail
on a duplicate key: the group then runs again reading its stored records first, so a batch sent
again answers its replays in one transaction. A duplicate key that still happens (another
process writing the same key at the same moment) sends each member to a transaction of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from billing.errors import BillingError
from billing.holds import Hold, HoldRequest, Refusal, decide_hold
from billing.metering import Gate, UsageRequest, meter_usage, units_from_costs
from billing.store import holds
from billing.store.books import Books, insert
from billing.store.database import LEGACY_USAGE_KEY, Database, Doc
from billing.store.holds import hold_key
from billing.store.meter_writes import MeterWrites, UsageResult, stored_result, usage_id
from billing.store.transactions import run_in_transaction
from billing.weeks import iso_week

#: A duplicate key that is not a replay (two transactions opening the same meter or writing the
#: same notification) is retried this many times before it is reported.
DUPLICATE_RETRIES = 5
#: Records committed in one transaction at most (a whole `POST /v1/usage/batch`). On the embedded
#: server a group's cost is mostly one write per document, and each organization's meter is
#: written once per group however many of its records the group holds, so bigger groups cost
#: less per record (BENCHMARKS.md, usage). The transaction stays well under a second and a few
#: hundred kilobytes.
GROUP_MAX = 1000


@dataclass(frozen=True)
class HoldOrder:
    """A balance hold asked of `Meters.hold`: it waits in the group commit like a record."""

    org_id: str
    request: HoldRequest


#: What a member of a group commit answers.
Outcome = UsageResult | Hold | Refusal


@dataclass
class _Pending:
    """A usage record or a hold waiting for its group's commit, and where its caller waits."""

    request: UsageRequest | HoldOrder
    now: datetime
    result: asyncio.Future[Outcome]

    def answer(self, result: Outcome | BaseException) -> None:
        if self.result.done():  # the caller may have gone (a cancelled request)
            return
        if isinstance(result, BaseException):
            self.result.set_exception(result)
        else:
            self.result.set_result(result)


#: What a group decides holds with: an organization's quota gate at a moment and the plan id its
#: units are priced on, from what the group read of it (`Meters._gate_of`).
Gates = Callable[[Books, str, datetime], tuple[Gate, str]]


class GroupCommit:
    """The queue of one process's records and holds, committed group after group."""

    def __init__(self, db: Database, writes: MeterWrites, gates: Gates) -> None:
        self.db = db
        self.writes = writes
        self.gates = gates
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None

    async def submit(self, request: UsageRequest | HoldOrder, now: datetime) -> Outcome:
        """Apply a usage record or a hold in the next group commit: the records that arrive
        while a group is committing wait for the next one, and each group is one transaction
        (records of any organization, applied in arrival order), so under load a commit
        carries many records and at low load a lone record commits at once."""
        loop = asyncio.get_running_loop()
        if self._committer is not None and self._committer.get_loop() is not loop:
            # Used from another event loop than before (tests, embedded runs): records queued
            # on the old loop cannot be served from this one.
            self._queue = [p for p in self._queue if p.result.get_loop() is loop]
            self._committer = None
        pending = _Pending(request, now, loop.create_future())
        self._queue.append(pending)
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_groups())
        return await pending.result

    async def _commit_groups(self) -> None:
        group: list[_Pending] = []
        try:
            while self._queue:
                group, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
                await self._commit(group)
        except BaseException as exc:  # cancelled with its loop: nobody may wait forever
            for pending in group + self._queue:
                pending.answer(exc if isinstance(exc, Exception) else RuntimeError("stopped"))
            self._queue = []
            raise

    async def _commit(self, group: list[_Pending]) -> None:
        """Commit `group` in one transaction; on a duplicate key, once more reading the stored
        records first, then each member alone, in arrival order."""
        for replays in (False, True):
            try:
                results = await run_in_transaction(
                    self.db.client, partial(self._apply, group, replays))
            except DuplicateKeyError:
                continue
            except Exception as exc:  # the database failed: every member of the group says so
                for pending in group:
                    pending.answer(exc)
                return
            for pending, result in zip(group, results, strict=True):
                pending.answer(result)
            return
        for pending in group:
            try:
                pending.answer(await self._alone(pending))
            except Exception as exc:
                pending.answer(exc)

    async def _alone(self, pending: _Pending) -> Outcome | BillingError:
        """One member in a transaction of its own: a replay answers the stored first result."""
        for _ in range(DUPLICATE_RETRIES):
            try:
                return (await run_in_transaction(
                    self.db.client, partial(self._apply, [pending], True)))[0]
            except DuplicateKeyError:
                if isinstance(pending.request, UsageRequest):
                    legacy = await self._legacy_stored(pending.request)
                    if legacy is not None:
                        return stored_result(legacy)
        raise RuntimeError(f"{pending.request!r} kept hitting duplicate keys")

    async def _legacy_stored(self, request: UsageRequest) -> Doc | None:
        """The first record of `request`'s key in a database created before keys became `_id`s:
        stored under an `ObjectId`, it is found by `LEGACY_USAGE_KEY` while that index exists
        (its duplicate key is what brought the replay here)."""
        if LEGACY_USAGE_KEY not in await self.db.usage.index_information():
            return None
        return await self.db.usage.find_one(
            {"org_id": request.org_id, "run_id": request.run_id, "step": request.step})

    async def _apply(self, members: list[_Pending], replays: bool,
                     session: AsyncClientSession) -> list[Outcome | BillingError]:
        return await _Group(self, session, members, replays).apply()


class _Group:
    """One group's unit of work: read once, decide in arrival order, write in bulk.

    Balance holds are decided on the same accounts (which keep their subscription standing, so a
    past-due organization is refused with no read of `subscriptions`) and meters (this week's and
    those that may keep active holds, `billing.store.holds.keeping`), in arrival order with the
    records (a record that settles a hold takes it off its meter and so frees it for the holds
    after it); the holds granted go on their meters and their records are inserted in bulk.

    A record repeating the key of an earlier one in the group answers that one's result; with
    `replays`, records and holds already stored are read first and answer their stored result.
    A member refused (an unknown organization, invalid units) answers its error; nothing of it
    was planned, so the others commit."""

    def __init__(self, commit: GroupCommit, session: AsyncClientSession,
                 members: list[_Pending], replays: bool) -> None:
        self.commit = commit
        self.writes = commit.writes
        self.db = commit.db
        self.session = session
        self.members = members
        self.replays = replays
        self.books = Books(commit.db, session)
        self.records: list[Doc] = []  # the usage records to insert
        self.first: dict[str, UsageResult] = {}  # by key: a key repeated in the group answers it
        self.stored: dict[str, Doc] = {}  # with `replays`: records stored before, by key
        self.granted: dict[str, Hold] = {}  # by key: a key repeated in the group answers it
        self.stored_holds: dict[str, Hold] = {}
        self.hold_docs: list[Doc] = []

    async def apply(self) -> list[Outcome | BillingError]:
        await self._read()
        results: list[Outcome | BillingError] = []
        for pending in self.members:
            try:
                if isinstance(pending.request, HoldOrder):
                    results.append(self._decide_hold(pending.request, pending.now))
                else:
                    results.append(self._record(pending.request, pending.now))
            except BillingError as exc:
                results.append(exc)
        await self._flush()
        refused = {index: hold_key(p.request.org_id, p.request.request.hold_id)
                   for index, p in enumerate(self.members)
                   if isinstance(p.request, HoldOrder) and isinstance(results[index], Refusal)}
        if refused:  # a repeated hold id answers its first hold, even when it would not fit now
            found = await holds.stored_in(self.db, self.session, refused.values())
            for index, key in refused.items():
                results[index] = found.get(key, results[index])
        return results

    async def _read(self) -> None:
        """Read what the group is decided on, one query per collection."""
        weeks = {(p.request.org_id, iso_week(p.now)) for p in self.members}
        holding = {key for p in self.members if _holds(p.request)
                   for key in holds.keeping(p.request.org_id, p.now)}
        await self.books.load({org for org, _ in weeks}, weeks | holding)
        if not self.replays:
            return
        keys = [usage_id(p.request) for p in self.members if isinstance(p.request, UsageRequest)]
        cursor = self.db.usage.find({"_id": {"$in": keys}}, session=self.session)
        self.stored = {doc["_id"]: doc async for doc in cursor}
        self.stored_holds = await holds.stored_in(self.db, self.session, (
            hold_key(p.request.org_id, p.request.request.hold_id) for p in self.members
            if isinstance(p.request, HoldOrder)))

    def _record(self, request: UsageRequest, now: datetime) -> UsageResult:
        key = usage_id(request)
        if key in self.stored:
            return stored_result(self.stored[key])
        if key in self.first:
            return replace(self.first[key], applied=False)
        week = iso_week(now)
        self.books.account(request.org_id)  # an unknown organization is refused here
        _, plan = self.writes.plan_of(self.books, request.org_id, week)
        # may refuse: nothing planned yet
        metered = meter_usage(request, plan, self.writes.config.meter)
        result, doc = self.writes.record(self.books, request, metered, plan, now, week)
        self.records.append(doc)
        self.first[key] = result
        if request.hold_id is not None:  # settled only if it still counts: never twice
            holds.free(self.books, request.org_id, request.hold_id, now)
        return result

    def _decide_hold(self, order: HoldOrder, now: datetime) -> Hold | Refusal:
        """Decide one hold on the group's state (`billing.holds.decide_hold`); a granted one
        counts for the ones after it."""
        org_id, request = order.org_id, order.request
        key = hold_key(org_id, request.hold_id)
        if key in self.stored_holds or key in self.granted:
            return self.stored_holds.get(key) or self.granted[key]
        gate, plan_id = self.commit.gates(self.books, org_id, now)
        units = request.units
        if units is None:
            config = self.writes.config
            units = units_from_costs(request.costs, config.plan(plan_id), config.meter).units
        decided = decide_hold(gate, hold_id=request.hold_id, units=units,
                              ttl_seconds=request.ttl_seconds, now=now)
        if isinstance(decided, Hold):
            self.writes.reserve(self.books, org_id, decided.reservation(), iso_week(now))
            self.granted[key] = decided
            self.hold_docs.append(holds.hold_doc(org_id, decided, now))
        return decided

    async def _flush(self) -> None:
        """Write what the group decided: the usage records and the holds' records first (a
        replay's duplicate key shows there), then the write engine's meters (with the holds
        granted and settled), ledger and notifications."""
        if self.records:
            await insert(self.db.usage, self.records, self.session)
        if self.hold_docs:
            await insert(self.db.holds, self.hold_docs, self.session)
        await self.books.flush(self.members[-1].now)


def _holds(request: UsageRequest | HoldOrder) -> bool:
    """Whether a member reads or writes its organization's holds: a hold, a record settling one."""
    return isinstance(request, HoldOrder) or request.hold_id is not None

