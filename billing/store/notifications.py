"""Notifications (SPEC §5.6): written in the transaction of the change that caused them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.errors import OrgNotFound
from billing.store import outbox
from billing.store.database import Database, Doc
from billing.store.transactions import run_in_transaction

NOTIFICATION_TYPES = frozenset(
    {
        "meter.threshold_crossed",
        "extras.balance_threshold_crossed",
        "extras.runaway_debit",
        "payment.failed",
        "plan.changed",
        "plan.unresolved",
        "subscription.expired",
        "refund.created",
        "refund.unresolved",
        "refund.reversed",
        "purchase.unresolved",
        "purchase.failed",
        "dispute.opened",
        "dispute.lost",
        "dispute.reinstated",
        "reconcile.divergence",
        "auto_topup.succeeded",
        "auto_topup.failed",
        "auto_topup.paused",
        "auto_topup.disabled",
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
    finds it there. A new notification takes the organization's next `seq` in the same
    transaction (the account's `notification_seq` counter), so the sequence has no gap and no
    repeat and a reader paging by `seq` never misses one. It enters the outbox in the same
    transaction, so its outbound deliveries (SPEC §5.7) are started after commit even across a
    crash. Without a session it runs in a transaction of its own.
    """
    if type not in NOTIFICATION_TYPES:
        raise ValueError(f"unknown notification type {type!r}")
    if session is None:
        async def alone(own: AsyncClientSession) -> bool:
            return await notify(db, own, org_id=org_id, type=type, key=key, payload=payload,
                                now=now)

        return await run_in_transaction(db.client, alone)
    result = await db.notifications.update_one(
        {"org_id": org_id, "key": key},
        {"$setOnInsert": {"type": type, "payload": payload, "created_at": now, **outbox.MARK}},
        upsert=True,
        session=session,
    )
    if result.upserted_id is None:
        return False
    await db.notifications.update_one(
        {"_id": result.upserted_id}, {"$set": {"seq": await _next_seq(db, session, org_id)}},
        session=session,
    )
    return True


async def _next_seq(db: Database, session: AsyncClientSession, org_id: str) -> int:
    counted = await db.accounts.update_one(
        {"_id": org_id}, {"$inc": {"notification_seq": 1}}, session=session
    )
    if counted.matched_count != 1:
        raise OrgNotFound(org_id)
    account = await db.accounts.find_one({"_id": org_id}, {"notification_seq": 1},
                                         session=session)
    assert account is not None
    return int(account["notification_seq"])


async def feed(
    db: Database, org_id: str, *, after: int, limit: int
) -> tuple[list[Doc], int | None]:
    """Notifications with `seq > after`, oldest first, and the `after` of the next page (None at
    the end)."""
    cursor = db.notifications.find({"org_id": org_id, "seq": {"$gt": after}}).sort(
        "seq", 1).limit(limit + 1)
    docs = [doc async for doc in cursor]
    more = len(docs) > limit
    page = docs[:limit]
    return page, int(page[-1]["seq"]) if more else None


async def assign_missing_seqs(db: Database) -> int:
    """Give every notification written before sequence numbers existed its `seq`, oldest first
    per organization. Idempotent: run at every start."""
    assigned = 0
    cursor = db.notifications.find({"seq": {"$exists": False}}, {"org_id": 1}).sort(
        [("org_id", 1), ("created_at", 1), ("_id", 1)])
    async for doc in cursor:
        async def one(session: AsyncClientSession, doc: Doc = doc) -> bool:
            current = await db.notifications.find_one({"_id": doc["_id"]}, {"seq": 1},
                                                      session=session)
            if current is None or "seq" in current:  # another process numbered it first
                return False
            await db.notifications.update_one(
                {"_id": doc["_id"]},
                {"$set": {"seq": await _next_seq(db, session, doc["org_id"])}},
                session=session,
            )
            return True

        assigned += await run_in_transaction(db.client, one)
    return assigned
