"""Data written by an earlier release, brought to the current shape at every start (idempotent:
each step only touches what it has not done yet)."""

from __future__ import annotations

from billing.store.database import Database
from billing.store.notifications import assign_missing_seqs
from billing.store.subscriptions import Subscriptions


async def migrate(db: Database, subscriptions: Subscriptions) -> dict[str, int]:
    """Run every step; returns how many documents each one changed."""
    return {
        "subscriptions kept one by one": await subscriptions.migrate(),
        "notifications numbered": await assign_missing_seqs(db),
    }
