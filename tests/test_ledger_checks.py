"""The shared ledger check (`ledger_checks.violations`) on a refunded cart, the case the chaos
soak found the fault tests' older per-lot check misreading: one refund entry for a cart of two
packs, its units recorded on both lots. The check must pass it, and must still catch a lot that
records more than was taken."""

from __future__ import annotations

from datetime import datetime

from ledger_checks import violations
from ledger_ops import clawback

from billing.ledger import EntryKind
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.documents import LotTerms
from billing.store.ledger import Ledger


async def refunded_cart(ledger: Ledger, accounts: Accounts, org: str,
                        now: datetime) -> list[str]:
    """A cart of two packs (4900 and 900 cents) bought with one payment intent, then refunded
    in full: the lots' ids."""
    await accounts.ensure_in(None, org, now)
    lots = []
    for line, (units, cents) in enumerate([(500000, 4900), (100000, 900)], start=1):
        terms = LotTerms(payment_intent=f"pi_{org}", charge=f"ch_{org}", price_cents=cents,
                         pack_id="pack", line=line)
        key = f"payment:pi_{org}" + ("" if line == 1 else f":{line}")
        result = await ledger.write(org, key=key, kind=EntryKind.TOPUP, amount=units, now=now,
                                    terms=terms)
        assert result.entry is not None
        lots.append(str(result.entry["lot_id"]))
    await clawback(ledger, org, key=f"refund:re_{org}", kind=EntryKind.REFUND, lot_ids=lots,
                   cents=5800, now=now)
    return lots


async def test_a_refunded_cart_keeps_every_invariant(
        ledger: Ledger, accounts: Accounts, db: Database, org: str, now: datetime) -> None:
    await refunded_cart(ledger, accounts, org, now)
    assert [e["amount"] async for e in db.ledger.find(
        {"org_id": org, "kind": EntryKind.REFUND})] == [-600000]
    assert await violations(db, org, now) == []


async def test_a_lot_recording_more_than_was_taken_is_a_violation(
        ledger: Ledger, accounts: Accounts, db: Database, org: str, now: datetime) -> None:
    lots = await refunded_cart(ledger, accounts, org, now)
    await db.lots.update_one({"_id": lots[1]}, {"$inc": {"clawed_units": -1}})
    found = await violations(db, org, now)
    assert len(found) == 1 and f"purchase pi_{org}" in found[0], found
