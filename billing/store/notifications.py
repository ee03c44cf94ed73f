"""Notifications (SPEC §5.6): written in the transaction of the change that caused them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.store.database import Database, Doc

NOTIFICATION_TYPES = frozenset(
    {
        "meter.threshold_crossed",
        "extras.balance_threshold_crossed",
        "extras.runaway_debit",
        "payment.failed",
        "plan.changed",
        "plan.unresolved",
        "subscription.expired",
        "refund.unresolved",
        "refund.reversed",
        "purchase.unresolved",
        "purchase.failed",
        "dispute.opened",
        "dispute.lost",
        "dispute.reinstated",
        "reconcile.divergence",
    }
)


async def notify(
    db: Database,
    session: AsyncClientSession | None,
    *,
    org_id: str,
    type: str,
    key: str,
    payload: dict[str, Any],
    now: datetime,
) -> bool:
    """Record a notification once per `(org_id, key)`; True when this call wrote it.

    The key makes "exactly once" hold under retries and concurrency: `meter.threshold_crossed`
    for week W and threshold 80 has the key `meter.threshold_crossed:W:80`, and a second writer
    finds it there.
    """
    if type not in NOTIFICATION_TYPES:
        raise ValueError(f"unknown notification type {type!r}")
    result = await db.notifications.update_one(
        {"org_id": org_id, "key": key},
        {"$setOnInsert": {"type": type, "payload": payload, "created_at": now}},
        upsert=True,
        session=session,
    )
    return result.upserted_id is not None


async def list_notifications(db: Database, org_id: str, limit: int = 100) -> list[Doc]:
    cursor = db.notifications.find({"org_id": org_id}).sort("created_at", -1).limit(limit)
    return [doc async for doc in cursor]
