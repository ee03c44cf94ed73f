"""The reconciliation's rules (pure), and its reads over a ledger every kind of entry touched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ledger_ops import clawback, reinstate

from billing.config import BillingConfig, ReconcileConfig
from billing.ledger import EntryKind
from billing.metering import UsageRequest
from billing.models import LedgerSums
from billing.reconcile import (
    LedgerState,
    LotState,
    add_entries,
    is_divergent,
    ledger_divergences,
    meter_divergence,
    subscription_divergences,
)
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.documents import LotTerms
from billing.store.ledger import Ledger
from billing.store.meters import Meters
from billing.store.reconcile import ReconcileStore
from billing.weeks import iso_week

TOLERANCE = ReconcileConfig(tolerance_units=50, tolerance_ratio=Decimal("0.005"))


@pytest.mark.parametrize(
    ("expected", "actual", "divergent"),
    [
        (100000, 99400, True),  # gap 600 > max(50, 500)
        (100000, 99600, False),  # gap 400 <= 500
        (100000, 100500, False),  # 500 <= 0.005 * 100500 = 502.5
        (100000, 100503, True),  # 503 > 502.515
        (10000, 10050, False),  # exactly the 50-unit floor (0.005 * 10050 = 50.25)
        (0, 50, False),
        (0, 51, True),
        (51, 0, True),
        (0, 0, False),
    ],
)
def test_divergence_rule(expected: int, actual: int, divergent: bool) -> None:
    assert is_divergent(expected, actual, TOLERANCE) is divergent
    assert is_divergent(actual, expected, TOLERANCE) is divergent


def test_ratio_is_decimal_exact() -> None:
    # 0.1 * 3 is 0.30000000000000004 in binary floats; in Decimal the gap of 3 is not above 3.
    tolerance = ReconcileConfig(tolerance_units=0, tolerance_ratio=Decimal("0.1"))
    assert not is_divergent(30, 27, tolerance)
    assert is_divergent(30, 26, tolerance)


def _state(**overrides: Any) -> LedgerState:
    base: dict[str, Any] = dict(
        org_id="acme", balance=300, usage_debt=0, other_debt=0, entries_total=300,
        lots=(LotState("lot_a", units=500, remaining=300, repaid_debt=0, drawn=200),),
    )
    return LedgerState(**{**base, **overrides})


def test_ledger_checks_name_what_disagrees() -> None:
    assert ledger_divergences(_state()) == []
    balance_off = ledger_divergences(_state(balance=307))
    assert [(d.kind, d.expected, d.actual) for d in balance_off] == [
        ("balance_vs_entries", 300, 307), ("balance_vs_lots", 300, 307)]
    lot_off = ledger_divergences(_state(
        lots=(LotState("lot_a", units=500, remaining=200, repaid_debt=0, drawn=200),)))
    assert [(d.kind, d.subject, d.expected, d.actual) for d in lot_off] == [
        ("lot_remaining", "lot_a", 300, 200), ("balance_vs_lots", "balance", 200, 300)]
    # Debt: balance -100 = remaining 0 - usage debt 100.
    assert ledger_divergences(_state(
        balance=-100, entries_total=-100, usage_debt=100,
        lots=(LotState("lot_a", units=500, remaining=0, repaid_debt=0, drawn=500),))) == []


def test_meter_check_reports_the_gap() -> None:
    found = meter_divergence("acme", "2026-W19", 99400, 100000, TOLERANCE)
    assert found is not None
    assert (found.check, found.kind, found.expected, found.actual) == (
        "meter", "overflow_vs_debits", 99400, 100000)
    assert meter_divergence("acme", "2026-W19", 99600, 100000, TOLERANCE) is None
    # a meter opened before meters counted their overflow: nothing to compare
    assert meter_divergence("acme", "2026-W19", None, 100000, TOLERANCE) is None


def _sub(status: str, price: str) -> dict[str, Any]:
    return {"id": "sub_1", "status": status, "items": {"data": [{"price": {"id": price}}]}}


def test_subscription_check_reads_stripe_like_an_event(config: BillingConfig) -> None:
    def kinds(stripe: dict[str, Any], status: str, plan: str | None) -> list[tuple[str, Any]]:
        return [(d.kind, d.expected) for d in subscription_divergences(
            config, "acme", status=status, plan_id=plan, stripe_subscription=stripe)]

    assert kinds(_sub("active", "price_pro_yearly"), "active", "pro") == []
    assert kinds(_sub("past_due", "price_pro_yearly"), "active", "pro") == [("status", "past_due")]
    assert kinds(_sub("active", "price_starter_monthly"), "active", "pro") == [
        ("plan", "starter")]
    assert kinds(_sub("active", "price_gone"), "active", "pro") == [
        ("plan_unresolved", "price_gone")]
    # An expired subscription is what the engine records as canceled on the default plan.
    assert kinds(_sub("incomplete_expired", "price_pro_yearly"), "canceled", "free") == []


async def test_every_kind_of_entry_leaves_the_checks_quiet(
    db: Database, config: BillingConfig, org: str, now: datetime
) -> None:
    """Grant, usage debits into debt, purchase repaying it, expiry, refund, dispute and
    reinstatement, admin debit into debt, settlement: the reads agree with the ledger, so
    nothing is reported (a false divergence would page an operator every night)."""
    ledger, meters = Ledger(db), Meters(db, config)
    await Accounts(db, config).register(org, now)  # 500-unit grant on the free plan
    for run in range(3):
        await meters.record(UsageRequest(org_id=org, run_id=f"run-{run}", units=4000), now)
    pi = f"pi_{org}"
    await ledger.write(org, key=f"payment:{pi}", kind=EntryKind.TOPUP, amount=500000, now=now,
                       terms=LotTerms(payment_intent=pi, price_cents=4900, pack_id="pack_500k",
                                      expires_at=now + timedelta(days=365)))
    soon = await ledger.write(org, key="admin:soon", kind=EntryKind.ADJUSTMENT, amount=1000,
                              now=now, terms=LotTerms(expires_at=now + timedelta(hours=1)))
    assert soon.entry is not None
    expired = await ledger.expire(org, soon.entry["lot_id"], now + timedelta(hours=2))
    assert expired.applied
    lot = await db.lots.find_one({"payment_intent": pi})
    assert lot is not None
    await clawback(ledger, org, key="refund:re_1", kind=EntryKind.REFUND, lot_ids=[lot["_id"]],
                          cents=1633, now=now)
    await clawback(ledger, org, key="dispute:dp_1:withdrawn", kind=EntryKind.DISPUTE,
                          lot_ids=[lot["_id"]], cents=4900, now=now)
    await reinstate(ledger, org, key="dispute:dp_1:reinstated",
                           withdrawn_key="dispute:dp_1:withdrawn", now=now)
    await ledger.write(org, key="admin:debit", kind=EntryKind.ADJUSTMENT, amount=-600000, now=now)
    await ledger.write(org, key="settle:2026-W20", kind=EntryKind.SETTLEMENT, amount=5000, now=now)
    await meters.record(UsageRequest(org_id=org, run_id="run-late", units=300), now)

    # Chunks of 2 sequence numbers: the sums are carried from chunk to chunk.
    chunks: list[LedgerSums] = []
    found = await ReconcileStore(db, chunk=2).read_org(LedgerSums(org_id=org), iso_week(now),
                                                       chunks.append)

    assert found is not None
    account = await db.accounts.find_one({"_id": org})
    assert account is not None
    seq = account["seq"]
    assert [c.through_seq for c in chunks] == [*range(2, seq, 2), seq]
    assert ledger_divergences(found.ledger) == []
    assert found.overflow == found.debited == 3 * 4000 + 300
    assert meter_divergence(org, iso_week(now), found.overflow, found.debited,
                            config.reconcile) is None
    assert account["balance"] == found.ledger.entries_total
    assert account["usage_debt"] + account["other_debt"] > 0  # the debts took part

    # The same week's meter as a release before the overflow counter opened it: not compared.
    await db.meters.update_one({"org_id": org, "week": iso_week(now)},
                               {"$unset": {"overflow_counted": ""}})
    older = await ReconcileStore(db, chunk=2).read_org(LedgerSums(org_id=org), iso_week(now),
                                                       chunks.append)
    assert older is not None and older.overflow is None


WEEK_START = datetime(2026, 5, 4, tzinfo=UTC)
WEEK_END = WEEK_START + timedelta(days=7)


def _entry(seq: int, amount: int, *, key: str = "", kind: str = "debit",
           draws: tuple[tuple[str, int], ...] = (), days: int = 1) -> dict[str, Any]:
    return {"seq": seq, "amount": amount, "kind": kind, "key": key or f"usage:run-{seq}:initial",
            "created_at": WEEK_START + timedelta(days=days),
            "draws": [{"lot_id": lot, "units": units} for lot, units in draws]}


def test_sums_count_each_entry_once_and_only_the_weeks_usage_debits() -> None:
    entries = [
        _entry(1, 500, kind="grant", key="grant:signup"),
        _entry(2, -200, draws=(("lot_a", 200),)),
        _entry(3, -100, draws=(("lot_a", 100),), days=-1),  # the week before
        _entry(4, -50, kind="adjustment", key="admin:r1", draws=(("lot_a", 50),)),
        _entry(5, -30, kind="debit", key="usage:late:initial", days=7),  # the week after
    ]
    sums = add_entries(LedgerSums(org_id="acme"), entries, through_seq=5,
                       week_start=WEEK_START, week_end=WEEK_END)
    assert (sums.through_seq, sums.entries_total, sums.drawn, sums.week_usage_debits) == (
        5, 120, {"lot_a": 350}, 200)


@given(amounts=st.lists(st.integers(-10**6, 10**6).filter(bool), max_size=30),
       cuts=st.lists(st.integers(0, 30), max_size=5))
def test_chunked_sums_equal_one_pass(amounts: list[int], cuts: list[int]) -> None:
    """However the entries are split into chunks by `seq`, the sums are those of one pass."""
    entries = [_entry(seq, amount, draws=(((f"lot_{seq % 3}", -amount),) if amount < 0 else ()))
               for seq, amount in enumerate(amounts, start=1)]
    whole = add_entries(LedgerSums(org_id="acme"), entries, through_seq=len(entries),
                        week_start=WEEK_START, week_end=WEEK_END)
    chunked = LedgerSums(org_id="acme")
    for upto in sorted({*(min(c, len(entries)) for c in cuts), len(entries)}):
        chunk = [e for e in entries if chunked.through_seq < e["seq"] <= upto]
        chunked = add_entries(chunked, chunk, through_seq=upto, week_start=WEEK_START,
                              week_end=WEEK_END)
    assert chunked == whole
    assert whole.entries_total == sum(amounts)


async def test_a_read_resumed_from_carried_sums_counts_nothing_twice(
    db: Database, config: BillingConfig, org: str, now: datetime
) -> None:
    """A retry carries the sums of the chunks already read; entries written since are read in
    the snapshot: the readings are those of a fresh read."""
    meters = Meters(db, config)
    await Accounts(db, config).register(org, now)
    for run in range(5):
        await meters.record(UsageRequest(org_id=org, run_id=f"run-{run}", units=300), now)
    carried: list[LedgerSums] = []
    store = ReconcileStore(db, chunk=2)
    await store.read_org(LedgerSums(org_id=org), iso_week(now), carried.append)
    for run in range(5, 8):  # written after the chunks were read
        await meters.record(UsageRequest(org_id=org, run_id=f"run-{run}", units=300), now)

    reread: list[LedgerSums] = []
    resumed = await store.read_org(carried[-1], iso_week(now), reread.append)
    fresh = await store.read_org(LedgerSums(org_id=org), iso_week(now), lambda _: None)

    assert resumed is not None and resumed == fresh
    assert reread[0].through_seq > carried[-1].through_seq  # no chunk read again
    assert ledger_divergences(resumed.ledger) == []
    assert resumed.ledger.entries_total == 500 - 8 * 300
    assert resumed.overflow == resumed.debited == 8 * 300
