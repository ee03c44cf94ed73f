"""The ledger invariants of SPEC §5.1, checked on one organization's stored documents."""

from __future__ import annotations

from billing.ledger import EntryKind, check_sign
from billing.store.database import Database, Doc


async def assert_consistent(db: Database, org: str) -> Doc:
    """SPEC §5.1 invariants of one organization; returns its account.

    `balance == sum(entries) == sum(lot.remaining) - debt`, debts never negative, each key once,
    entries signed by kind and chained by `balance_after`, every lot within `0..units`.
    """
    account = await db.accounts.find_one({"_id": org})
    assert account is not None
    entries = await entries_of(db, org)
    lots = [x async for x in db.lots.find({"org_id": org})]
    assert account["balance"] == sum(e["amount"] for e in entries)
    assert account["usage_debt"] >= 0 and account["other_debt"] >= 0
    assert account["balance"] == (
        sum(x["remaining"] for x in lots) - account["usage_debt"] - account["other_debt"]
    )
    assert len({e["key"] for e in entries}) == len(entries)
    running = 0
    for e in entries:
        check_sign(EntryKind(e["kind"]), e["amount"])
        running += e["amount"]
        assert e["balance_after"] == running
    for x in lots:
        assert 0 <= x["remaining"] <= x["units"]
    return account


async def entries_of(db: Database, org: str) -> list[Doc]:
    return [e async for e in db.ledger.find({"org_id": org}).sort("seq", 1)]
