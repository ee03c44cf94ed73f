"""Which receivers a notification still waits for (SPEC §5.7), for the oldest-undelivered
gauge: `undelivered` lists the receiver hashes whose delivery has not answered 2xx yet and
`undelivered_since` is the notification's `created_at`; both go away with the last delivery.

The list is written before the deliveries start (a fast receiver may answer before the
dispatcher's next write) and only while the notification has none, so a dispatcher that starts
the same deliveries again after a crash never brings back a receiver already served (one whose
workflow already completed is taken off again by the dispatcher).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING

from billing.store.database import Database

UNDELIVERED = {"undelivered_since": {"$type": "date"}}


async def expect(db: Database, notification_id: Any, receivers: list[str],
                 created_at: datetime) -> None:
    """Record the receivers a notification waits for; a no-op when it was recorded before."""
    await db.notifications.update_one(
        {"_id": notification_id, "undelivered_since": {"$exists": False}},
        {"$set": {"undelivered": receivers, "undelivered_since": created_at}},
    )


async def delivered(db: Database, notification_id: Any, receiver: str) -> None:
    """One receiver answered 2xx; idempotent."""
    await db.notifications.update_one({"_id": notification_id},
                                      {"$pull": {"undelivered": receiver}})
    await db.notifications.update_one(
        {"_id": notification_id, "undelivered": []},
        {"$unset": {"undelivered": "", "undelivered_since": ""}},
    )


async def oldest_undelivered(db: Database) -> datetime | None:
    """`created_at` of the oldest notification a receiver has not acknowledged yet (its
    delivery running, waiting for a retry, or failed)."""
    doc = await db.notifications.find_one(UNDELIVERED, {"undelivered_since": 1},
                                          sort=[("undelivered_since", ASCENDING)])
    return None if doc is None else doc["undelivered_since"]
