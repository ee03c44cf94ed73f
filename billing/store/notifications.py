"""Notifications (SPEC §5.6): their types and the feed. They are written in the transaction of the
change that caused them, by the write engine (`billing.store.books.notify`)."""

from __future__ import annotations

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.errors import OrgNotFound
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
