"""Data written by an earlier release, brought to the current shape when a worker starts.

Each step is idempotent and touches only what it has not done yet, but finding that out reads a
whole collection, so its cost grows with the data (measured on the embedded server: 6.6 s for
5,000 organizations with a subscription, at every start). A step that runs and finds nothing left
to change is therefore recorded in `migrations` and not run again: the first start after an
upgrade migrates, the next one confirms and records. A process of the older release still
writing after that would leave its documents unmigrated, so an upgrade is finished (no process of
the older release left) before the new workers start a second time (README, "Start-up
migrations").
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from pymongo.errors import DuplicateKeyError

from billing.clock import utcnow
from billing.store.database import Database
from billing.store.notifications import assign_missing_seqs
from billing.store.subscriptions import Subscriptions

Step = Callable[[Database, Subscriptions], Awaitable[int]]

#: Every step by the name it is recorded under; a step's name never changes.
STEPS: dict[str, Step] = {
    "subscriptions kept one by one": lambda db, subscriptions: subscriptions.migrate(),
    "notifications numbered": lambda db, subscriptions: assign_missing_seqs(db),
}


async def migrate(db: Database, subscriptions: Subscriptions) -> dict[str, int]:
    """Run every step not recorded done; returns how many documents each one changed."""
    done = {doc["_id"] async for doc in db.migrations.find({}, {"_id": 1})}
    changed: dict[str, int] = {}
    for name, step in STEPS.items():
        if name in done:
            continue
        changed[name] = await step(db, subscriptions)
        if changed[name] == 0:
            # Two workers starting together may both record it: the second finds it there.
            with contextlib.suppress(DuplicateKeyError):
                await db.migrations.update_one(
                    {"_id": name}, {"$setOnInsert": {"done_at": utcnow()}}, upsert=True)
    return changed
