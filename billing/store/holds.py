"""Balance holds on MongoDB (SPEC §5.11): one document per hold, `_id` `<org>/<hold_id>`.

A hold's `until` is its expiry while it counts; settling or releasing removes it, so the
active holds of an organization are one range of the `(org_id, until)` index
(`until > now`) and an expired hold leaves that range by itself, with no write. The document
stays (the answer of a repeated `hold_id`), so no sweep is needed.

Grants of one organization are serialized by MongoDB, not by a process: each grant bumps the
organization's document in `hold_locks` inside its transaction, so two concurrent grants
write-conflict and `run_in_transaction` starts the loser again on a fresh snapshot, where it
sees the winner's hold. The grant itself is `Meters.hold` (it reads the quota gate).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from billing.errors import NotFound
from billing.holds import Hold
from billing.store.accounts import check_org_id
from billing.store.database import Database, Doc
from billing.store.transactions import run_in_transaction


def hold_key(org_id: str, hold_id: str) -> str:
    """A hold's `_id`: unambiguous, as neither part may contain `/`."""
    return f"{org_id}/{hold_id}"


def _hold(doc: Doc) -> Hold:
    return Hold(hold_id=doc["hold_id"], units=int(doc["units"]), expires_at=doc["expires_at"],
                remaining=int(doc["remaining"]))


async def active_in(db: Database, session: AsyncClientSession | None, org_ids: Iterable[str],
                    now: datetime) -> dict[str, list[Hold]]:
    """The holds of each organization that count at `now`, soonest expiry first."""
    found: dict[str, list[Hold]] = {org_id: [] for org_id in org_ids}
    cursor = db.holds.find({"org_id": {"$in": sorted(found)}, "until": {"$gt": now}},
                           session=session)
    async for doc in cursor:
        found[doc["org_id"]].append(_hold(doc))
    for active in found.values():
        active.sort(key=lambda hold: (hold.expires_at, hold.hold_id))
    return found


async def stored_in(db: Database, session: AsyncClientSession,
                    keys: Iterable[str]) -> dict[str, Hold]:
    """The holds stored under `keys` (`hold_key`), by key."""
    cursor = db.holds.find({"_id": {"$in": sorted(set(keys))}}, session=session)
    return {doc["_id"]: _hold(doc) async for doc in cursor}


async def lock_in(db: Database, session: AsyncClientSession, org_ids: Iterable[str]) -> None:
    """The write every grant makes to its organization's lock: concurrent grants conflict on
    it."""
    await db.hold_locks.bulk_write(
        [UpdateOne({"_id": org_id}, {"$inc": {"grants": 1}}, upsert=True)
         for org_id in sorted(set(org_ids))], ordered=False, session=session)


def hold_doc(org_id: str, hold: Hold, now: datetime) -> Doc:
    return {"_id": hold_key(org_id, hold.hold_id), "org_id": org_id, "hold_id": hold.hold_id,
            "units": hold.units, "expires_at": hold.expires_at, "until": hold.expires_at,
            "remaining": hold.remaining, "created_at": now}


def settle(org_id: str, hold_id: str, by: str, now: datetime) -> UpdateOne:
    """The write by which usage record `by` settles a hold: only a hold that still counts at
    `now`, so settling twice, or settling a released or expired hold, changes nothing."""
    return UpdateOne({"_id": hold_key(org_id, hold_id), "until": {"$gt": now}},
                     {"$unset": {"until": ""}, "$set": {"settled_by": by, "settled_at": now}})


async def release(db: Database, org_id: str, hold_id: str, now: datetime) -> bool:
    """Release a hold; True when it counted until now (releasing twice, or a settled or
    expired hold, changes nothing). An unknown hold is `HOLD_NOT_FOUND`."""
    check_org_id(org_id)

    async def work(session: AsyncClientSession) -> bool:
        released = await db.holds.update_one(
            {"_id": hold_key(org_id, hold_id), "until": {"$gt": now}},
            {"$unset": {"until": ""}, "$set": {"released_at": now}}, session=session)
        if released.modified_count:
            return True
        if await db.holds.find_one({"_id": hold_key(org_id, hold_id)}, {"_id": 1},
                                   session=session) is None:
            raise NotFound(f"organization {org_id!r} has no hold {hold_id!r}",
                           code="HOLD_NOT_FOUND")
        return False

    return await run_in_transaction(db.client, work)
