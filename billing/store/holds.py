"""Balance holds on MongoDB (SPEC §5.11).

An organization's holds that may still count are kept on the meter of the week they were
granted in (`MeterWeek.holds`: id, units, expiry), written by the same meter write that a group
commit makes anyway: granting a hold adds it there, the usage record that settles it takes it
off in its own meter update, releasing takes it off. A hold lives at most a day, so the holds
that count at a moment are on this week's meter and, during a week's first day, last week's
(`billing.holds.weeks_holding`): one meter query reads them. An expired hold stops counting by
its expiry with no write, and is pruned whenever its meter is written anyway.

The meter write is also what serializes the grants of one organization across processes: two
transactions that grant on it write the same meter document, so one write-conflicts and
`run_in_transaction` starts it again on a fresh snapshot, where it sees the other's hold.

Each grant is also recorded for good in `holds` (`_id` `<org>/<hold_id>`, written once with
the grant): the answer of a repeated `hold_id`, and what tells a released hold from an unknown
one. The grant itself is `Meters.hold` (it reads the quota gate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import datetime
from functools import partial

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from billing.errors import NotFound
from billing.holds import Hold, Reservation, weeks_holding
from billing.store.accounts import check_org_id
from billing.store.books import Books
from billing.store.database import Database, Doc
from billing.store.documents import MeterWeek
from billing.store.meter_writes import MeterWrites
from billing.store.transactions import run_in_transaction
from billing.weeks import iso_week

#: The index of `holds` by which an earlier release found the active holds (`until > now`); its
#: presence tells the start-up migration that active holds may still have to move to meters.
LEGACY_ACTIVE_INDEX = "active"
#: The collection whose per-organization document an earlier release bumped with every grant.
LEGACY_LOCKS = "hold_locks"


def hold_key(org_id: str, hold_id: str) -> str:
    """A hold's `_id`: unambiguous, as neither part may contain `/`."""
    return f"{org_id}/{hold_id}"


def keeping(org_id: str, now: datetime) -> list[tuple[str, str]]:
    """The `(org_id, week)` of the meters that may keep the organization's active holds."""
    return [(org_id, week) for week in weeks_holding(now)]


def active(books: Books, org_id: str, now: datetime) -> list[Reservation]:
    """The organization's holds that count at `now`, as the books leave them (`keeping` loaded),
    soonest expiry first."""
    return _active((books.meter(org_id, week) for week in weeks_holding(now)), now)


def _active(meters: Iterable[MeterWeek | None], now: datetime) -> list[Reservation]:
    found = [h for meter in meters if meter is not None for h in meter.holds if h.active(now)]
    return sorted(found, key=lambda hold: (hold.expires_at, hold.hold_id))


async def active_in(db: Database, org_id: str, now: datetime) -> list[Reservation]:
    """The organization's holds that count at `now`, read from its meters."""
    meters = await read_meters(db, org_id, now)
    return _active(meters.values(), now)


async def read_meters(db: Database, org_id: str, now: datetime) -> dict[str, MeterWeek]:
    """The organization's meters that may keep its active holds, by week (this week's among
    them when it is open)."""
    cursor = db.meters.find({"org_id": org_id, "week": {"$in": weeks_holding(now)}})
    return {doc["week"]: MeterWeek.from_doc(doc) async for doc in cursor}


def free(books: Books, org_id: str, hold_id: str, now: datetime) -> bool:
    """Take hold `hold_id` off its meter (settled or released) when it counts at `now`; False
    when it does not (unknown, settled, released or expired): nothing changes."""
    return any(books.unreserve(meter, hold_id, now) for week in weeks_holding(now)
               if (meter := books.meter(org_id, week)) is not None)


async def stored_in(db: Database, session: AsyncClientSession,
                    keys: Iterable[str]) -> dict[str, Hold]:
    """The holds granted under `keys` (`hold_key`), as their grants answered, by key."""
    cursor = db.holds.find({"_id": {"$in": sorted(set(keys))}}, session=session)
    return {doc["_id"]: Hold(hold_id=doc["hold_id"], units=int(doc["units"]),
                             expires_at=doc["expires_at"], remaining=int(doc["remaining"]))
            async for doc in cursor}


def hold_doc(org_id: str, hold: Hold, now: datetime) -> Doc:
    """The record of a grant in `holds`."""
    return {"_id": hold_key(org_id, hold.hold_id), "org_id": org_id, "hold_id": hold.hold_id,
            "units": hold.units, "expires_at": hold.expires_at, "remaining": hold.remaining,
            "created_at": now}


async def release(db: Database, org_id: str, hold_id: str, now: datetime) -> bool:
    """Release a hold; True when it counted until now (releasing twice, or a settled or
    expired hold, changes nothing). An unknown hold is `HOLD_NOT_FOUND`."""
    check_org_id(org_id)

    async def work(session: AsyncClientSession) -> bool:
        books = Books(db, session)
        await books.load((), keeping(org_id, now))
        if free(books, org_id, hold_id, now):
            await books.flush(now)
            return True
        if await db.holds.find_one({"_id": hold_key(org_id, hold_id)}, {"_id": 1},
                                   session=session) is None:
            raise NotFound(f"organization {org_id!r} has no hold {hold_id!r}",
                           code="HOLD_NOT_FOUND")
        return False

    return await run_in_transaction(db.client, work)


async def move_to_meters(db: Database, writes: MeterWrites, now: datetime) -> int:
    """Start-up migration from the release that kept active holds in `holds` (`until > now`,
    the `active` index) and serialized grants on `hold_locks`: put each hold still counting on
    its organization's meter of this week, then drop that index, and drop `hold_locks`. Returns
    the holds moved. Each organization moves in one transaction that also removes its holds'
    `until`, so a second run (workers starting together, a start that stopped half-way) moves
    none twice and cannot bring back a hold settled since."""
    await db[LEGACY_LOCKS].drop()  # nothing reads it; a process of that release may rewrite it
    if LEGACY_ACTIVE_INDEX not in await db.holds.index_information():
        return 0
    counting: dict[str, list[Reservation]] = {}
    async for doc in db.holds.find({"until": {"$gt": now}}):  # once: no index leads `until`
        counting.setdefault(doc["org_id"], []).append(
            Reservation(doc["hold_id"], int(doc["units"]), doc["expires_at"]))
    moved = 0
    for org_id, reservations in sorted(counting.items()):
        moved += await run_in_transaction(
            db.client, partial(_move, db, writes, org_id, reservations, now))
    with contextlib.suppress(OperationFailure):  # another process dropped it first
        await db.holds.drop_index(LEGACY_ACTIVE_INDEX)
    return moved


async def _move(db: Database, writes: MeterWrites, org_id: str, reservations: list[Reservation],
                now: datetime, session: AsyncClientSession) -> int:
    keys = [hold_key(org_id, r.hold_id) for r in reservations]
    still = {doc["hold_id"] async for doc in db.holds.find(
        {"_id": {"$in": keys}, "until": {"$gt": now}}, {"hold_id": 1}, session=session)}
    if not still:  # moved by another start meanwhile
        return 0
    books, week = Books(db, session), iso_week(now)
    await books.load([org_id], [(org_id, week)])
    for reservation in reservations:
        if reservation.hold_id in still:
            writes.reserve(books, org_id, reservation, week)
    await db.holds.update_many({"_id": {"$in": keys}}, {"$unset": {"until": ""}},
                               session=session)
    await books.flush(now)
    return len(still)
