"""Ledger operations in a transaction of their own, as tests call them (the engine always runs
them inside the transaction of a larger change)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.ledger import EntryKind
from billing.store.books import LedgerResult
from billing.store.ledger import Ledger
from billing.store.transactions import run_in_transaction


async def clawback(ledger: Ledger, org_id: str, *, key: str, kind: EntryKind,
                   lot_ids: list[str], cents: int, now: datetime,
                   meta: dict[str, Any] | None = None,
                   scope: str | None = None) -> LedgerResult:
    async def work(session: AsyncClientSession) -> LedgerResult:
        return await ledger.clawback_in(session, org_id, key=key, kind=kind, lot_ids=lot_ids,
                                        cents=cents, now=now, meta=meta, scope=scope)

    return await run_in_transaction(ledger.db.client, work)


async def reinstate(ledger: Ledger, org_id: str, *, key: str, withdrawn_key: str, now: datetime,
                    lot_ids: list[str] | None = None) -> LedgerResult:
    """Give back what `withdrawn_key` took; `lot_ids` default to the lots it took from."""
    if lot_ids is None:
        cursor = ledger.db.lots.find({"org_id": org_id, "clawbacks.key": withdrawn_key}, {"_id": 1})
        lot_ids = [doc["_id"] async for doc in cursor] or ["lot_unknown"]

    async def work(session: AsyncClientSession) -> LedgerResult:
        return await ledger.reinstate_in(session, org_id, key=key, withdrawn_key=withdrawn_key,
                                         lot_ids=lot_ids, now=now)

    return await run_in_transaction(ledger.db.client, work)
