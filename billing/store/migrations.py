"""Data written by an earlier release, brought to the current shape at every start (idempotent:
each step only touches what it has not done yet)."""

from __future__ import annotations

import contextlib
from functools import partial

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.ledger import OpenLot
from billing.store.database import LEGACY_LOTS_REMAINING, LOTS_PAYMENT_INDEXES, SWEEP_AT, Database
from billing.store.documents import lot_payment, lots_doc
from billing.store.holds import move_to_meters
from billing.store.meter_writes import MeterWrites
from billing.store.notifications import assign_missing_seqs
from billing.store.subscriptions import Subscriptions
from billing.store.transactions import run_in_transaction


async def migrate(db: Database, subscriptions: Subscriptions,
                  config: BillingConfig) -> dict[str, int]:
    """Run every step; returns how many documents each one changed."""
    return {
        "subscriptions kept one by one": await subscriptions.migrate(),
        "standings copied onto accounts": await subscriptions.copy_standings(),
        "notifications numbered": await assign_missing_seqs(db),
        "purchased lots indexed in lot_payments": await index_lot_payments(db),
        "active holds moved to meters": await move_to_meters(db, MeterWrites(config), utcnow()),
        "accounts given their open lots": await lots_onto_accounts(db),
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


async def lots_onto_accounts(db: Database) -> int:
    """Start-up migration from the release that kept a lot's units left on the lot (`remaining`,
    the `org_remaining` index): put each account's open lots on it, mark its expiring ones for
    the sweep (`sweep_at`) and take `remaining` off its lots, one organization per transaction,
    then drop that index. Returns the accounts moved. An account that has its lots already is
    left alone, so a second run (workers starting together, a start that stopped half-way)
    moves none twice."""
    if LEGACY_LOTS_REMAINING not in await db.lots.index_information():
        return 0
    pending = [doc["_id"] async for doc in db.accounts.find({"lots": {"$exists": False}},
                                                            {"_id": 1})]
    moved = 0
    for org_id in pending:
        moved += await run_in_transaction(db.client, partial(_lots_onto_account, db, org_id))
    with contextlib.suppress(OperationFailure):  # another process dropped it first
        await db.lots.drop_index(LEGACY_LOTS_REMAINING)
    return moved


async def _lots_onto_account(db: Database, org_id: str, session: AsyncClientSession) -> int:
    account = await db.accounts.find_one({"_id": org_id}, {"lots": 1}, session=session)
    if account is None or "lots" in account:  # moved by another start meanwhile
        return 0
    cursor = db.lots.find({"org_id": org_id, "remaining": {"$gt": 0}},
                          {"remaining": 1, "expires_at": 1, "seq": 1}, session=session)
    lots = sorted([OpenLot(id=doc["_id"], remaining=int(doc["remaining"]),
                           expires_at=doc.get("expires_at"), seq=int(doc["seq"]))
                   async for doc in cursor], key=lambda lot: lot.seq)
    await db.accounts.update_one({"_id": org_id}, {"$set": {"lots": lots_doc(lots)}},
                                 session=session)
    expiring = [UpdateOne({"_id": lot.id}, {"$set": {SWEEP_AT: lot.expires_at}})
                for lot in lots if lot.expires_at is not None]
    if expiring:
        await db.lots.bulk_write(expiring, ordered=False, session=session)
    await db.lots.update_many({"org_id": org_id}, {"$unset": {"remaining": ""}},
                              session=session)
    return 1
