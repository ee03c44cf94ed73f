"""The ledger of SPEC §5.1 on the real database: accounts, entries, lots, debt and concurrency."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta
from typing import Any

import pytest
from ledger_checks import assert_consistent, entries_of, lots_of
from ledger_ops import clawback, reinstate
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from billing.errors import InvalidInput, NotFound, OrgNotFound
from billing.ledger import EntryKind
from billing.store.accounts import SIGNUP_GRANT_KEY, Accounts, check_org_id
from billing.store.books import LedgerResult
from billing.store.database import Database, Doc
from billing.store.documents import LotTerms
from billing.store.ledger import Ledger
from billing.store.transactions import run_in_transaction

PACK_UNITS = 500_000
PACK_CENTS = 4900
YEAR = timedelta(days=365)


# ---- helpers -----------------------------------------------------------------------------------


async def open_account(accounts: Accounts, org: str, now: datetime) -> None:
    """An account without the signup grant, so balances start at zero."""
    assert await accounts.ensure_in(None, org, now)


async def buy(
    ledger: Ledger,
    org: str,
    now: datetime,
    pi: str,
    *,
    units: int = PACK_UNITS,
    cents: int = PACK_CENTS,
    expires_at: datetime | None = None,
    paid_cents: int | None = None,
) -> LedgerResult:
    return await ledger.write(
        org,
        key=f"payment:{pi}",
        kind=EntryKind.TOPUP,
        amount=units,
        now=now,
        terms=LotTerms(
            payment_intent=f"{pi}-{org}",  # Stripe ids are unique: one org per payment intent
            charge=f"ch_{pi}-{org}",
            price_cents=cents,
            paid_cents=paid_cents,
            pack_id="pack_500k",
            expires_at=expires_at,
        ),
    )


async def debit(ledger: Ledger, org: str, now: datetime, run: str, units: int) -> LedgerResult:
    return await ledger.write(
        org, key=f"usage:{run}:initial", kind=EntryKind.DEBIT, amount=-units, now=now
    )


async def refund(
    ledger: Ledger, org: str, now: datetime, re: str, lot_id: str, cents: int
) -> LedgerResult:
    return await clawback(ledger, org,
        key=f"refund:{re}", kind=EntryKind.REFUND, lot_ids=[lot_id], cents=cents, now=now
    )


async def write_in(ledger: Ledger, org: str, **entry: Any) -> LedgerResult:
    """`Ledger.write_in` in a transaction of its own."""
    async def work(session: AsyncClientSession) -> LedgerResult:
        return await ledger.write_in(session, org, **entry)

    return await run_in_transaction(ledger.db.client, work)


def lot_of(result: LedgerResult) -> str:
    assert result.applied and result.entry is not None
    return str(result.entry["lot_id"])


async def lot_doc(db: Database, lot_id: str) -> Doc:
    """The lot's record with its units left as its account keeps them."""
    found = await db.lots.find_one({"_id": lot_id})
    assert found is not None
    account = await db.accounts.find_one({"_id": found["org_id"]})
    assert account is not None
    return (await lots_of(db, account))[0][lot_id]


# ---- accounts ----------------------------------------------------------------------------------


async def test_registration_writes_the_signup_grant_once(accounts, ledger, db, org, now):
    first = await accounts.register(org, now)
    assert (first.org_id, first.plan_id, first.created) == (org, "free", True)
    again = await accounts.register(org, now + timedelta(days=1))
    assert (again.plan_id, again.created) == ("free", False)
    entries = await entries_of(db, org)
    assert [(e["key"], e["kind"], e["amount"]) for e in entries] == [
        (SIGNUP_GRANT_KEY, "grant", 500)
    ]
    [grant] = await ledger.lots(org)
    assert (grant["units"], grant["remaining"], grant["expires_at"]) == (500, 500, None)
    account = await assert_consistent(db, org)
    assert account["balance"] == 500


async def test_concurrent_registrations_create_one_account_and_one_grant(accounts, db, org, now):
    results = await asyncio.gather(*(accounts.register(org, now) for _ in range(10)))
    assert sum(r.created for r in results) == 1
    assert await db.accounts.count_documents({"_id": org}) == 1
    assert await db.ledger.count_documents({"org_id": org}) == 1
    assert (await assert_consistent(db, org))["balance"] == 500


async def test_an_account_named_by_a_stripe_event_gets_no_grant(accounts, db, org, now):
    await open_account(accounts, org, now)
    assert not await accounts.ensure_in(None, org, now)
    assert (await accounts.get(org))["balance"] == 0
    assert await db.ledger.count_documents({"org_id": org}) == 0


async def test_unknown_organization_is_rejected_and_nothing_is_written(
    accounts, ledger, db, org, now
):
    with pytest.raises(OrgNotFound) as raised:
        await debit(ledger, org, now, "r1", 10)
    assert raised.value.code == "ORG_NOT_FOUND" and raised.value.status == 404
    with pytest.raises(OrgNotFound):
        await ledger.write(org, key="admin:a", kind=EntryKind.ADJUSTMENT, amount=5, now=now)
    with pytest.raises(OrgNotFound):
        await refund(ledger, org, now, "re_1", "lot_x", 100)
    with pytest.raises(OrgNotFound):
        await reinstate(ledger, org,
            key="dispute:dp:reinstated", withdrawn_key="dispute:dp:withdrawn", now=now
        )
    with pytest.raises(OrgNotFound):
        await ledger.expire(org, "lot_x", now)
    with pytest.raises(OrgNotFound):
        await accounts.get(org)
    assert await db.accounts.count_documents({"_id": org}) == 0
    assert await db.ledger.count_documents({"org_id": org}) == 0
    assert await db.lots.count_documents({"org_id": org}) == 0


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "org/1", "$where", {"$gt": ""}, None, 7])
async def test_malformed_organization_ids_are_rejected(accounts, now, bad):
    with pytest.raises(InvalidInput) as raised:
        check_org_id(bad)
    assert raised.value.code == "INVALID_ORG_ID"
    if isinstance(bad, str):
        with pytest.raises(InvalidInput):
            await accounts.register(bad, now)


# ---- entries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "amount"),
    [
        (EntryKind.DEBIT, 0),
        (EntryKind.ADJUSTMENT, 0),
        (EntryKind.TOPUP, 0),
        (EntryKind.DEBIT, 5),
        (EntryKind.GRANT, -5),
        (EntryKind.EXPIRATION, 5),
    ],
)
async def test_zero_or_wrongly_signed_entries_are_rejected(
    accounts, ledger, db, org, now, kind, amount
):
    await open_account(accounts, org, now)
    with pytest.raises(InvalidInput):
        await ledger.write(org, key="k", kind=kind, amount=amount, now=now)
    with pytest.raises(InvalidInput):
        await refund(ledger, org, now, "re_0", "lot_x", 0)
    assert await db.ledger.count_documents({"org_id": org}) == 0
    assert await db.lots.count_documents({"org_id": org}) == 0
    assert (await accounts.get(org))["seq"] == 0  # the aborted transaction left no lock behind


async def test_replaying_a_key_returns_the_first_entry_and_writes_nothing(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    first = await buy(ledger, org, now, "pi_1")
    assert first.applied and first.amount == PACK_UNITS and first.balance == PACK_UNITS
    replay = await ledger.write(org, key="payment:pi_1", kind=EntryKind.TOPUP, amount=7, now=now)
    assert not replay.applied
    assert replay.entry is not None and replay.entry["_id"] == first.entry["_id"]
    assert replay.amount == PACK_UNITS and replay.balance == PACK_UNITS
    d1 = await debit(ledger, org, now, "r1", 100)
    assert (await debit(ledger, org, now, "r1", 100)).applied is False
    assert d1.balance == PACK_UNITS - 100
    assert await db.ledger.count_documents({"org_id": org}) == 2
    assert await db.lots.count_documents({"org_id": org}) == 1
    assert (await assert_consistent(db, org))["balance"] == PACK_UNITS - 100


async def test_debit_beyond_the_balance_goes_negative_and_the_next_topup_repays_it(
    accounts, ledger, db, org, now
):
    await accounts.register(org, now)  # 500 signup grant
    over = await debit(ledger, org, now, "r1", 1500)
    assert over.applied and over.balance == -1000
    assert over.entry["draws"] == [{"lot_id": over.entry["draws"][0]["lot_id"], "units": 500}]
    assert over.entry["debt_added"] == 1000
    account = await assert_consistent(db, org)
    assert (account["balance"], account["usage_debt"], account["other_debt"]) == (-1000, 1000, 0)

    top = await buy(ledger, org, now, "pi_1")
    assert top.balance == PACK_UNITS - 1000
    assert top.entry["repaid"] == {"other": 0, "usage": 1000}
    lot = await lot_doc(db, lot_of(top))
    assert (lot["units"], lot["remaining"], lot["repaid_debt"]) == (
        PACK_UNITS,
        PACK_UNITS - 1000,
        1000,
    )
    account = await assert_consistent(db, org)
    assert (account["usage_debt"], account["other_debt"]) == (0, 0)


async def test_debits_draw_earliest_expiry_first_and_lots_without_expiry_last(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    never = lot_of(
        await ledger.write(org, key="grant:a", kind=EntryKind.GRANT, amount=100, now=now)
    )
    late = lot_of(await buy(ledger, org, now, "pi_late", units=100, expires_at=now + YEAR))
    soon_old = lot_of(
        await buy(ledger, org, now, "pi_so", units=100, expires_at=now + timedelta(days=3))
    )
    soon_new = lot_of(
        await buy(ledger, org, now, "pi_sn", units=100, expires_at=now + timedelta(days=3))
    )
    never_new = lot_of(
        await ledger.write(org, key="admin:x", kind=EntryKind.ADJUSTMENT, amount=100, now=now)
    )
    result = await debit(ledger, org, now, "r1", 450)
    assert [(d["lot_id"], d["units"]) for d in result.entry["draws"]] == [
        (soon_old, 100),
        (soon_new, 100),
        (late, 100),
        (never, 100),
        (never_new, 50),
    ]
    remaining = {x["_id"]: x["remaining"] for x in await ledger.lots(org, open_only=False)}
    assert remaining == {soon_old: 0, soon_new: 0, late: 0, never: 0, never_new: 50}
    await assert_consistent(db, org)


async def test_expired_lots_are_not_drawn(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    expired = lot_of(
        await buy(
            ledger, org, now - YEAR, "pi_old", units=1000, expires_at=now - timedelta(seconds=1)
        )
    )
    live = lot_of(await buy(ledger, org, now, "pi_new", units=300))
    result = await debit(ledger, org, now, "r1", 500)
    assert result.entry["draws"] == [{"lot_id": live, "units": 300}]
    assert result.entry["debt_added"] == 200
    assert (await lot_doc(db, expired))["remaining"] == 1000
    account = await assert_consistent(db, org)
    assert (account["balance"], account["usage_debt"]) == (800, 200)
    # the sweep then takes the expired remainder; the debt stays
    expiry = await ledger.expire(org, expired, now)
    assert expiry.applied and expiry.amount == -1000
    account = await assert_consistent(db, org)
    assert (account["balance"], account["usage_debt"]) == (-200, 200)


async def test_admin_adjustments_of_both_signs(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    plus = await ledger.write(org, key="admin:r1", kind=EntryKind.ADJUSTMENT, amount=1000, now=now)
    assert plus.entry["lot_id"] is not None
    minus = await ledger.write(
        org, key="admin:r2", kind=EntryKind.ADJUSTMENT, amount=-1500, now=now
    )
    assert minus.balance == -500 and minus.entry["debt_added"] == 500
    account = await assert_consistent(db, org)
    assert (account["usage_debt"], account["other_debt"]) == (0, 500)


async def test_settlement_repays_only_usage_debt(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    await debit(ledger, org, now, "r1", 300)
    await ledger.write(org, key="admin:r1", kind=EntryKind.ADJUSTMENT, amount=-200, now=now)
    settle = await ledger.write(
        org, key="settle:2026-W19", kind=EntryKind.SETTLEMENT, amount=300, now=now
    )
    assert settle.entry["repaid"] == {"other": 0, "usage": 300}
    account = await assert_consistent(db, org)
    assert (account["balance"], account["usage_debt"], account["other_debt"]) == (-200, 0, 200)
    # an ordinary credit repays the other debt first
    top = await ledger.write(org, key="grant:g", kind=EntryKind.GRANT, amount=50, now=now)
    assert top.entry["repaid"] == {"other": 50, "usage": 0}


# ---- expiry ------------------------------------------------------------------------------------


async def test_expiry_removes_only_the_unspent_remainder(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    lot = lot_of(
        await buy(ledger, org, now, "pi_1", units=1000, expires_at=now + timedelta(days=1))
    )
    await ledger.write(org, key="grant:keep", kind=EntryKind.GRANT, amount=50, now=now)
    await debit(ledger, org, now, "r1", 300)
    later = now + timedelta(days=2)
    assert org in await ledger.orgs_with_expired_lots(later, None, 1000)
    result = await ledger.expire(org, lot, later)
    assert result.applied
    assert (result.entry["kind"], result.entry["key"], result.amount) == (
        "expiration",
        f"expire:{lot}",
        -700,
    )
    assert result.balance == 50
    assert (await lot_doc(db, lot))["remaining"] == 0
    assert org not in await ledger.orgs_with_expired_lots(later, None, 1000)  # swept
    assert await ledger.expired_lots(org, later) == []
    replay = await ledger.expire(org, lot, later + timedelta(days=1))
    assert not replay.applied and replay.entry["_id"] == result.entry["_id"]
    assert await db.ledger.count_documents({"org_id": org, "kind": "expiration"}) == 1
    assert (await assert_consistent(db, org))["balance"] == 50


async def test_a_fully_used_lot_expires_silently(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    lot = lot_of(
        await buy(ledger, org, now, "pi_1", units=1000, expires_at=now + timedelta(days=1))
    )
    await debit(ledger, org, now, "r1", 1000)
    later = now + timedelta(days=2)
    assert await ledger.expired_lots(org, later) == [lot]  # the sweep looks at it once
    result = await ledger.expire(org, lot, later)
    assert (result.applied, result.entry, result.balance) == (False, None, 0)
    assert await db.ledger.count_documents({"org_id": org, "kind": "expiration"}) == 0
    assert org not in await ledger.orgs_with_expired_lots(later, None, 1000)


async def test_a_lot_is_not_expired_before_its_time_or_without_expiry(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    dated = lot_of(
        await buy(ledger, org, now, "pi_1", units=1000, expires_at=now + timedelta(days=1))
    )
    undated = lot_of(
        await ledger.write(org, key="grant:g", kind=EntryKind.GRANT, amount=10, now=now)
    )
    assert not (await ledger.expire(org, dated, now)).applied
    assert not (await ledger.expire(org, undated, now + 100 * YEAR)).applied
    with pytest.raises(NotFound):
        await ledger.expire(org, "lot_missing", now)
    assert await db.ledger.count_documents({"org_id": org, "kind": "expiration"}) == 0
    # a lot that was not yet due can still expire later under the same key
    assert (await ledger.expire(org, dated, now + timedelta(days=1))).amount == -1000
    assert (await assert_consistent(db, org))["balance"] == 10


# ---- refunds and disputes ----------------------------------------------------------------------


async def test_full_refund_claws_back_exactly_the_pack(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1", expires_at=now + YEAR))
    result = await refund(ledger, org, now, "re_1", lot, PACK_CENTS)
    assert result.applied and result.amount == -PACK_UNITS and result.balance == 0
    assert result.entry["lot_id"] == lot and result.entry["meta"] == {"cents": PACK_CENTS}
    doc = await lot_doc(db, lot)
    assert (doc["remaining"], doc["clawed_units"], doc["clawback_cents"]) == (
        0,
        PACK_UNITS,
        PACK_CENTS,
    )
    await assert_consistent(db, org)


@pytest.mark.parametrize("order", sorted(set(itertools.permutations([1633, 1633, 1634]))))
async def test_partial_refunds_sum_to_exactly_the_pack(accounts, ledger, db, org, now, order):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1"))
    results = [await refund(ledger, org, now, f"re_{i}", lot, c) for i, c in enumerate(order)]
    assert all(r.applied for r in results)
    assert sum(r.amount for r in results) == -PACK_UNITS
    assert (await lot_doc(db, lot))["clawed_units"] == PACK_UNITS
    assert (await assert_consistent(db, org))["balance"] == 0


async def test_refunds_beyond_the_price_claw_back_no_more_than_was_bought(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1"))
    await refund(ledger, org, now, "re_1", lot, 4000)
    second = await refund(ledger, org, now, "re_2", lot, 4000)
    third = await refund(ledger, org, now, "re_3", lot, 100)
    assert second.amount == -(PACK_UNITS - 408_163)
    assert (third.applied, third.entry) == (False, None)
    assert (await lot_doc(db, lot))["clawed_units"] == PACK_UNITS
    assert (await assert_consistent(db, org))["balance"] == 0


async def test_refund_beyond_the_lot_remaining_becomes_debt(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1"))
    await debit(ledger, org, now, "r1", 400_000)
    result = await refund(ledger, org, now, "re_1", lot, PACK_CENTS)
    assert result.amount == -PACK_UNITS and result.balance == -400_000
    assert result.entry["draws"] == [{"lot_id": lot, "units": 100_000}]
    assert result.entry["debt_added"] == 400_000
    account = await assert_consistent(db, org)
    assert (account["usage_debt"], account["other_debt"]) == (0, 400_000)
    # the next purchase repays the refund debt first
    top = await buy(ledger, org, now, "pi_2")
    assert top.entry["repaid"] == {"other": 400_000, "usage": 0}
    assert (await lot_doc(db, lot_of(top)))["remaining"] == 100_000
    assert (await assert_consistent(db, org))["other_debt"] == 0


async def test_refund_excess_beyond_its_lot_is_drawn_from_other_lots_then_becomes_debt(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1", expires_at=now + YEAR))
    grant = lot_of(
        await ledger.write(org, key="grant:g", kind=EntryKind.GRANT, amount=1000, now=now)
    )
    await debit(ledger, org, now, "r1", 499_000)  # the expiring pack is drawn first
    held = (await assert_consistent(db, org))["balance"] - 1000  # the rest of the pack
    result = await refund(ledger, org, now, "re_1", lot, PACK_CENTS)
    assert result.entry["draws"][0] == {"lot_id": lot, "units": 1000}
    assert {"lot_id": grant, "units": 1000} in result.entry["draws"]
    assert result.entry["debt_added"] == 499_000 - held
    assert (await lot_doc(db, grant))["remaining"] == 0
    account = await assert_consistent(db, org)
    assert (account["balance"], account["other_debt"]) == (held - 499_000, 499_000 - held)
    assert not await ledger.lots(org)  # no debt beside a lot that still holds units


async def test_a_dispute_on_a_used_pack_draws_from_other_packs_and_a_win_gives_it_back(
    accounts, ledger, db, org, now
):
    """A used-up pack A disputed while pack B sits unused: the shortfall is drawn from B rather
    than left as debt beside it (a later expiry of B must not take its units a second time), and
    the reinstatement gives the units back in a lot of their own."""
    await open_account(accounts, org, now)
    pack_a = lot_of(await buy(ledger, org, now, "pi_a", expires_at=now + timedelta(days=10)))
    held = (await assert_consistent(db, org))["balance"]
    await debit(ledger, org, now, "r1", held)  # A (and any grant) used up, no debt
    pack_b = lot_of(await buy(ledger, org, now, "pi_b"))
    withdrawn = await clawback(ledger, org, key="dispute:dp_1:withdrawn",
                               kind=EntryKind.DISPUTE, lot_ids=[pack_a], cents=PACK_CENTS,
                               now=now)
    assert withdrawn.entry["draws"] == [{"lot_id": pack_b, "units": PACK_UNITS}]
    assert "debt_added" not in withdrawn.entry
    assert (await lot_doc(db, pack_b))["remaining"] == 0
    account = await assert_consistent(db, org)
    assert (account["balance"], account["other_debt"], account["usage_debt"]) == (0, 0, 0)
    reinstated = await reinstate(ledger, org, key="dispute:dp_1:reinstated",
                                 withdrawn_key="dispute:dp_1:withdrawn", now=now)
    assert reinstated.entry["repaid"] == {"other": 0, "usage": 0}
    account = await assert_consistent(db, org)
    assert (account["balance"], account["other_debt"]) == (PACK_UNITS, 0)


async def test_units_a_pack_spent_repaying_usage_debt_come_back_as_usage_debt(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    held = (await assert_consistent(db, org))["balance"]
    await debit(ledger, org, now, "r1", held + 100_000)  # 100000 of usage debt
    pack = lot_of(await buy(ledger, org, now, "pi_1"))
    assert (await lot_doc(db, pack))["remaining"] == PACK_UNITS - 100_000
    refunded = await refund(ledger, org, now, "re_1", pack, PACK_CENTS)
    assert refunded.amount == -PACK_UNITS and refunded.entry["debt_added"] == 100_000
    account = await assert_consistent(db, org)
    assert (account["balance"], account["usage_debt"], account["other_debt"]) == (
        -100_000, 100_000, 0)


async def test_clawback_from_an_expired_lot_takes_it_before_the_sweep(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now - YEAR, "pi_1", expires_at=now - timedelta(days=1)))
    result = await refund(ledger, org, now, "re_1", lot, PACK_CENTS)
    assert result.entry["draws"] == [{"lot_id": lot, "units": PACK_UNITS}]
    assert "debt_added" not in result.entry
    assert not (await ledger.expire(org, lot, now)).applied
    assert (await assert_consistent(db, org))["balance"] == 0


async def test_a_clawback_rounding_to_zero_units_still_counts_its_cents(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1", units=1, cents=3))
    first = await refund(ledger, org, now, "re_1", lot, 1)
    assert (first.applied, first.entry, first.notes) == (False, None, {"clawed_units": 0})
    replay = await refund(ledger, org, now, "re_1", lot, 1)
    assert not replay.applied
    assert (await lot_doc(db, lot))["clawback_cents"] == 1
    second = await refund(ledger, org, now, "re_2", lot, 1)  # 2 of 3 cents: 0.67 -> 1 unit
    assert second.applied and second.amount == -1
    assert await db.ledger.count_documents({"org_id": org, "kind": "refund"}) == 1
    assert (await assert_consistent(db, org))["balance"] == 0


async def test_clawback_needs_a_purchased_lot_of_the_organization(accounts, ledger, org, now):
    await open_account(accounts, org, now)
    grant = lot_of(await ledger.write(org, key="grant:g", kind=EntryKind.GRANT, amount=10, now=now))
    with pytest.raises(NotFound):
        await refund(ledger, org, now, "re_1", grant, 100)
    with pytest.raises(NotFound):
        await refund(ledger, org, now, "re_1", "lot_unknown", 100)
    with pytest.raises(ValueError):
        await clawback(ledger, org,
            key="refund:re_2", kind=EntryKind.DEBIT, lot_ids=[grant], cents=1, now=now
        )


async def test_replayed_clawback_writes_nothing(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1"))
    first = await refund(ledger, org, now, "re_1", lot, 1633)
    replay = await refund(ledger, org, now, "re_1", lot, 1633)
    assert not replay.applied and replay.entry["_id"] == first.entry["_id"]
    assert replay.balance == first.balance == PACK_UNITS - 166_633
    doc = await lot_doc(db, lot)
    assert (len(doc["clawbacks"]), doc["clawback_cents"], doc["clawed_units"]) == (1, 1633, 166_633)
    assert await db.ledger.count_documents({"org_id": org}) == 2


async def test_a_refund_of_a_mixed_cart_is_spread_over_everything_the_charge_paid_for(
    accounts, ledger, db, org, now
):
    """A 4900-cent pack and a 2500-cent T-shirt on one 7400-cent charge (SPEC 5.1): 2500 cents
    refunded claw back a third of the pack; 2450 more with `billing_scope: packs` half of it, in
    one cumulative rounding; 500 with `billing_scope: other` nothing; the scoped refund's
    reversal gives back what the refunds still standing no longer take."""
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1", paid_cents=7400))

    async def cart_refund(re: str, cents: int, scope: str | None = None) -> LedgerResult:
        return await clawback(ledger, org, key=f"refund:{re}", kind=EntryKind.REFUND,
                              lot_ids=[lot], cents=cents, now=now, scope=scope)

    assert (await cart_refund("re_1", 2500)).amount == -168_919
    assert (await cart_refund("re_2", 2450, "packs")).amount == -(418_919 - 168_919)
    other = await cart_refund("re_3", 500, "other")
    assert (other.applied, other.notes) == (False, {"clawed_units": 0})
    back = await reinstate(ledger, org, key="refund:re_2:reversed", withdrawn_key="refund:re_2",
                           now=now)
    assert back.amount == 250_000
    doc = await lot_doc(db, lot)
    assert (doc["clawed_units"], doc["clawback_cents"], doc["clawback_pack_cents"]) == (
        168_919, 2500, 0)
    assert (await assert_consistent(db, org))["balance"] == PACK_UNITS - 168_919


async def test_a_reinstated_dispute_restores_exactly_what_it_clawed_back(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    expires = now + YEAR
    lot = lot_of(await buy(ledger, org, now, "pi_1", expires_at=expires))
    await refund(ledger, org, now, "re_1", lot, 1633)
    withdrawn = await clawback(ledger, org,
        key="dispute:dp_1:withdrawn", kind=EntryKind.DISPUTE, lot_ids=[lot], cents=1633, now=now
    )
    assert withdrawn.amount == -166_632  # cumulative rounding with the earlier refund
    assert withdrawn.balance == PACK_UNITS - 166_633 - 166_632
    back = await reinstate(ledger, org,
        key="dispute:dp_1:reinstated", withdrawn_key="dispute:dp_1:withdrawn", now=now
    )
    assert back.applied and back.amount == 166_632
    assert back.balance == PACK_UNITS - 166_633
    new_lot = await lot_doc(db, lot_of(back))
    assert new_lot["_id"] != lot
    assert (new_lot["kind"], new_lot["units"], new_lot["remaining"]) == (
        "reinstatement",
        166_632,
        166_632,
    )
    assert (new_lot["source_lot"], new_lot["expires_at"]) == (lot, expires)
    assert new_lot["price_cents"] is None  # not itself a purchase to claw back from
    doc = await lot_doc(db, lot)
    assert (doc["clawback_cents"], doc["clawed_units"]) == (1633, 166_633)

    twice = await reinstate(ledger, org,
        key="dispute:dp_1:reinstated", withdrawn_key="dispute:dp_1:withdrawn", now=now
    )
    assert not twice.applied and twice.balance == back.balance
    assert await db.lots.count_documents({"org_id": org, "kind": "reinstatement"}) == 1
    replayed_withdrawal = await clawback(ledger, org,
        key="dispute:dp_1:withdrawn", kind=EntryKind.DISPUTE, lot_ids=[lot], cents=1633, now=now
    )
    assert not replayed_withdrawal.applied and replayed_withdrawal.balance == back.balance
    # the rest of the charge can still be refunded, and adds up to the pack exactly
    rest = await refund(ledger, org, now, "re_2", lot, PACK_CENTS - 1633)
    assert rest.amount == -(PACK_UNITS - 166_633)
    assert (await lot_doc(db, lot))["clawed_units"] == PACK_UNITS
    await assert_consistent(db, org)


async def test_a_reinstatement_before_its_withdrawal_voids_it(
    accounts, ledger, db, org, now
):
    """Stripe may deliver the reinstatement first: the withdrawal is voided, so the pair nets to
    zero in either order and nothing is written."""
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_1"))
    result = await reinstate(ledger, org, key="dispute:dp_9:reinstated",
                             withdrawn_key="dispute:dp_9:withdrawn", now=now, lot_ids=[lot])
    assert (result.applied, result.entry, result.notes) == (False, None, {"voided": True})
    late = await clawback(ledger, org, key="dispute:dp_9:withdrawn", kind=EntryKind.DISPUTE,
                          lot_ids=[lot], cents=PACK_CENTS, now=now)
    assert not late.applied
    again = await reinstate(ledger, org, key="dispute:dp_9:reinstated",
                            withdrawn_key="dispute:dp_9:withdrawn", now=now, lot_ids=[lot])
    assert not again.applied and not again.notes
    assert (await assert_consistent(db, org))["balance"] == PACK_UNITS + (
        await db.ledger.count_documents({"org_id": org, "kind": "grant"}) and 0)
    assert await db.ledger.count_documents({"org_id": org, "kind": {"$in": [
        "dispute", "reinstatement"]}}) == 0


# ---- reads -------------------------------------------------------------------------------------


async def test_entries_are_paged_newest_first(accounts, ledger, org, now):
    await open_account(accounts, org, now)
    for i in range(5):
        await ledger.write(org, key=f"grant:{i}", kind=EntryKind.GRANT, amount=i + 1, now=now)
    page = await ledger.entries(org, limit=3)
    assert [e["key"] for e in page] == ["grant:4", "grant:3", "grant:2"]
    rest = await ledger.entries(org, limit=3, before_seq=page[-1]["seq"])
    assert [e["key"] for e in rest] == ["grant:1", "grant:0"]


async def test_the_purchase_lots_are_found_by_payment_intent_or_charge(
    accounts, ledger, org, now
):
    await open_account(accounts, org, now)
    lot = lot_of(await buy(ledger, org, now, "pi_find"))
    by_pi = await ledger.find_purchase_lots(payment_intent=f"pi_find-{org}", charge=None)
    by_charge = await ledger.find_purchase_lots(payment_intent=None, charge=f"ch_pi_find-{org}")
    assert [d["_id"] for d in by_pi] == [d["_id"] for d in by_charge] == [lot]
    assert await ledger.find_purchase_lots(payment_intent=None, charge=None) == []
    assert await ledger.find_purchase_lots(payment_intent="pi_nobody", charge=None) == []


async def test_a_purchase_opens_the_account_in_its_lock(accounts, ledger, db, org, now):
    """A first purchase of an organization Stripe names first opens its account (default
    plan, no signup grant) with the lock itself, and the next lock finds it."""
    first = await write_in(ledger, org, key="payment:pi_open", kind=EntryKind.TOPUP, amount=700,
                           now=now, terms=LotTerms(payment_intent=f"pi_open-{org}"),
                           opening=accounts.opening(org, now), unused_key=True)
    second = await write_in(ledger, org, key="payment:pi_open:2", kind=EntryKind.TOPUP,
                            amount=300, now=now, opening=accounts.opening(org, now))
    assert first.applied and second.applied
    account = await assert_consistent(db, org)
    assert (account["plan_id"], account["balance"], account["seq"]) == ("free", 1000, 2)
    assert [e["seq"] for e in await entries_of(db, org)] == [1, 2]
    with pytest.raises(InvalidInput):
        accounts.opening("not an org id", now)


async def test_paid_for_tells_whether_a_payment_credited_any_organization(
    accounts, ledger, db, org, now
):
    await open_account(accounts, org, now)
    await buy(ledger, org, now, "pi_paid", cents=0)  # a free pack still counts as paid for
    async with db.client.start_session() as session:
        assert await ledger.paid_for_in(session, f"pi_paid-{org}")
        assert not await ledger.paid_for_in(session, "pi_nobody")


async def test_an_unused_key_that_is_used_is_refused_by_the_index(accounts, ledger, db, org, now):
    """`unused_key` skips the lookup, never the guarantee: a second entry of a key fails the
    transaction and writes nothing."""
    await open_account(accounts, org, now)
    await ledger.write(org, key="payment:pi_twice", kind=EntryKind.TOPUP, amount=10, now=now)
    with pytest.raises(DuplicateKeyError):
        await write_in(ledger, org, key="payment:pi_twice", kind=EntryKind.TOPUP, amount=10,
                       now=now, unused_key=True)
    account = await assert_consistent(db, org)
    assert account["balance"] == 10
    assert await db.lots.count_documents({"org_id": org}) == 1


# ---- concurrency -------------------------------------------------------------------------------


async def test_fifty_concurrent_debits_give_the_exact_balance(accounts, ledger, db, org, now):
    await accounts.register(org, now)
    await buy(ledger, org, now, "pi_1", expires_at=now + YEAR)
    results = await asyncio.gather(*(debit(ledger, org, now, f"r{i}", 20_000) for i in range(50)))
    assert all(r.applied for r in results)
    account = await assert_consistent(db, org)
    assert account["balance"] == 500 + PACK_UNITS - 50 * 20_000
    assert account["usage_debt"] == 50 * 20_000 - PACK_UNITS - 500
    assert await db.ledger.count_documents({"org_id": org, "kind": "debit"}) == 50
    assert sorted(r.balance for r in results) == [500_500 - 20_000 * n for n in range(50, 0, -1)]


async def test_one_key_written_concurrently_is_applied_once(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    results = await asyncio.gather(*(debit(ledger, org, now, "same", 123) for _ in range(20)))
    assert sum(r.applied for r in results) == 1
    assert {r.entry["_id"] for r in results} == {results[0].entry["_id"]}
    assert await db.ledger.count_documents({"org_id": org, "key": "usage:same:initial"}) == 1
    assert (await assert_consistent(db, org))["balance"] == -123


async def test_concurrent_clawbacks_of_one_lot_sum_exactly(accounts, ledger, db, org, now):
    await open_account(accounts, org, now)
    odd = lot_of(await buy(ledger, org, now, "pi_odd"))
    cents = lot_of(await buy(ledger, org, now, "pi_cents"))
    results = await asyncio.gather(
        *(
            refund(ledger, org, now, f"re_odd_{i}", odd, c)
            for i, c in enumerate([1633, 1633, 1634])
        ),
        *(refund(ledger, org, now, f"re_c_{i}", cents, 100) for i in range(49)),
    )
    assert sum(r.amount for r in results[:3]) == -PACK_UNITS
    assert sum(r.amount for r in results[3:]) == -PACK_UNITS
    for lot in (odd, cents):
        doc = await lot_doc(db, lot)
        assert (doc["clawed_units"], doc["clawback_cents"], doc["remaining"]) == (
            PACK_UNITS,
            PACK_CENTS,
            0,
        )
    assert (await assert_consistent(db, org))["balance"] == 0
