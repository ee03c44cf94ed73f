"""Data written by an earlier release, brought to the current shape at every start (idempotent:
each step only touches what it has not done yet)."""

from __future__ import annotations

import contextlib

from pymongo.errors import OperationFailure

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.store.database import LOTS_PAYMENT_INDEXES, Database
from billing.store.documents import lot_payment
from billing.store.holds import move_to_meters
from billing.store.meter_writes import MeterWrites
from billing.store.notifications import assign_missing_seqs
from billing.store.subscriptions import Subscriptions


async def migrate(db: Database, subscriptions: Subscriptions,
                  config: BillingConfig) -> dict[str, int]:
    """Run every step; returns how many documents each one changed."""
    return {
        "subscriptions kept one by one": await subscriptions.migrate(),
        "notifications numbered": await assign_missing_seqs(db),
        "purchased lots indexed in lot_payments": await index_lot_payments(db),
        "active holds moved to meters": await move_to_meters(db, MeterWrites(config), utcnow()),
    }


async def index_lot_payments(db: Database) -> int:
    """Copy every purchased lot of a database that still indexes them on `lots` into
    `lot_payments`, then drop those indexes (every new lot writes its `lot_payments` document
    itself). Until the drop, the unique purchase-line index of `lots` keeps holding."""
    indexed = await db.lots.index_information()
    if not any(name in indexed for name in LOTS_PAYMENT_INDEXES):
        return 0
    copied = 0
    async for lot in db.lots.find({"kind": "topup"}):
        doc = lot_payment(lot)
        if doc is not None:
            written = await db.lot_payments.update_one({"_id": doc["_id"]},
                                                       {"$setOnInsert": doc}, upsert=True)
            copied += written.upserted_id is not None
    for name in LOTS_PAYMENT_INDEXES:
        with contextlib.suppress(OperationFailure):  # another process dropped it first
            await db.lots.drop_index(name)
    return copied
