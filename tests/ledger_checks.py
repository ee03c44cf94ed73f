"""The ledger invariants of SPEC §5.1, checked on one organization's stored documents: the one
check the store, property, fault and scale-out tests and the chaos soak (`bench/soak.py`) share."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from billing.clock import utcnow
from billing.errors import InvalidInput
from billing.ledger import EntryKind, check_sign
from billing.store.database import Database, Doc


async def violations(db: Database, org: str, now: datetime | None = None) -> list[str]:
    """What breaks SPEC §5.1 in `org`'s documents (nothing: an empty list).

    `balance == sum(entries) == sum(lot.remaining) - debts`, every lot's units left where its
    entries say (`units - repaid debt - drawn`), on the account only while it has some, debts
    never negative and never
    beside a live lot, each key once, entries signed by kind and chained by `balance_after`,
    every lot within `0..units`, a reinstated lot keeps its original expiry, and what refunds
    and disputes took from a purchase (every lot of its payment intent, a cart's lines
    included) is what its lots record, never more than it bought.
    """
    account = await db.accounts.find_one({"_id": org})
    if account is None:
        return ["no account"]
    entries = await entries_of(db, org)
    lots, found = await lots_of(db, account)
    debts = account["usage_debt"], account["other_debt"]
    if min(debts) < 0:
        found.append(f"negative debt {debts}")
    total = sum(e["amount"] for e in entries)
    if account["balance"] != total:
        found.append(f"balance {account['balance']} != sum of entries {total}")
    remaining = sum(lot["remaining"] for lot in lots.values())
    if account["balance"] != remaining - sum(debts):
        found.append(f"balance {account['balance']} != lots' remaining {remaining} - debts "
                     f"{debts}")
    twice = [key for key, n in Counter(e["key"] for e in entries).items() if n > 1]
    if twice:
        found.append(f"keys applied twice: {twice}")
    running = 0
    for e in entries:
        try:
            check_sign(EntryKind(e["kind"]), e["amount"])
        except InvalidInput as exc:
            found.append(f"entry {e['key']}: {exc}")
        running += e["amount"]
        if e["balance_after"] != running:
            found.append(f"entry {e['key']}: balance_after {e['balance_after']} != {running}")
    moment = now or utcnow()
    if any(debts):
        live = [lot["_id"] for lot in lots.values() if lot["remaining"] > 0 and (
            lot.get("expires_at") is None or lot["expires_at"] > moment)]
        if live:
            found.append(f"debt {debts} beside live lots {live}")
    drawn = Counter[str]()
    for e in entries:
        for draw in e.get("draws") or ():
            drawn[draw["lot_id"]] += draw["units"]
    purchases: dict[str, list[Doc]] = {}
    for lot in lots.values():
        if lot["remaining"] != lot["units"] - lot["repaid_debt"] - drawn[lot["_id"]]:
            found.append(f"lot {lot['_id']}: remaining {lot['remaining']} != units - repaid "
                         f"debt - drawn {lot['units'] - lot['repaid_debt'] - drawn[lot['_id']]}")
        if not 0 <= lot["remaining"] <= lot["units"]:
            found.append(f"lot {lot['_id']}: remaining {lot['remaining']} of {lot['units']}")
        if lot["kind"] == EntryKind.REINSTATEMENT.value and \
                lot.get("expires_at") != lots[lot["source_lot"]].get("expires_at"):
            found.append(f"lot {lot['_id']}: reinstated with another expiry than its source")
        if lot["kind"] == EntryKind.TOPUP.value and lot.get("payment_intent"):
            purchases.setdefault(lot["payment_intent"], []).append(lot)
    for pi, bought in purchases.items():
        ids = {lot["_id"] for lot in bought}
        if not all(0 <= lot["clawed_units"] <= lot["units"] for lot in bought):
            found.append(f"purchase {pi}: clawed back beyond what it bought")
        clawed = -sum(e["amount"] for e in entries
                      if e["kind"] in (EntryKind.REFUND, EntryKind.DISPUTE) and e["lot_id"] in ids)
        reinstated = sum(x["units"] for x in lots.values() if x.get("source_lot") in ids)
        recorded = sum(lot["clawed_units"] for lot in bought)
        if clawed - reinstated != recorded:
            found.append(f"purchase {pi}: refunds and disputes took {clawed}, reinstated "
                         f"{reinstated}, its lots record {recorded} clawed")
    return found


async def lots_of(db: Database, account: Doc) -> tuple[dict[str, Doc], list[str]]:
    """The organization's lot records, each with its units left as its account keeps them (0
    when not there), and what is wrong with the account's list of open lots."""
    records = {lot["_id"]: lot async for lot in db.lots.find({"org_id": account["_id"]})}
    kept = account.get("lots", [])
    found = [f"lot {lot['id']}: on the account with {lot['remaining']} units left"
             for lot in kept if lot["remaining"] <= 0 or lot["id"] not in records]
    ids = [lot["id"] for lot in kept]
    if len(ids) != len(set(ids)):
        found.append(f"a lot twice on the account: {ids}")
    left = {lot["id"]: lot["remaining"] for lot in kept}
    return {lot_id: {**lot, "remaining": left.get(lot_id, 0)}
            for lot_id, lot in records.items()}, found


async def assert_consistent(db: Database, org: str, now: datetime | None = None) -> Doc:
    """`violations` must find nothing; returns the account."""
    found = await violations(db, org, now)
    assert not found, f"{org}: {found}"
    account = await db.accounts.find_one({"_id": org})
    assert account is not None
    return account


async def entries_of(db: Database, org: str) -> list[Doc]:
    return [e async for e in db.ledger.find({"org_id": org}).sort("seq", 1)]
