"""Unit tests of the pure ledger rules (`billing.ledger`) and money helpers (`billing.money`)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import InvalidInput
from billing.ledger import (
    NEGATIVE_KINDS,
    POSITIVE_KINDS,
    ClawShare,
    Debt,
    EntryKind,
    OpenLot,
    check_sign,
    clawback_units,
    drawable,
    plan_credit,
    plan_draw,
    plan_expiry,
    plan_purchase_clawback,
)
from billing.money import dollars, round_half_up_div

NOW = datetime(2026, 5, 6, 12, 0, tzinfo=UTC)
PACK_UNITS = 500_000
PACK_CENTS = 4900


def lot(id_: str, remaining: int, *, days: float | None, seq: int) -> OpenLot:
    expires = None if days is None else NOW + timedelta(days=days)
    return OpenLot(id=id_, remaining=remaining, expires_at=expires, seq=seq)


def claw_sequence(cents: list[int], units: int = PACK_UNITS, price: int = PACK_CENTS) -> list[int]:
    """Units each successive clawback of `cents` takes from one lot, as the store applies them."""
    total_cents = clawed = 0
    taken: list[int] = []
    for c in cents:
        total_cents += c
        step = clawback_units(
            lot_units=units,
            lot_price_cents=price,
            clawed_cents_total=total_cents,
            already_clawed=clawed,
        )
        clawed += step
        taken.append(step)
    return taken


def exact_half_up(numerator: int, denominator: int) -> int:
    """Reference rounding through `Fraction`, independent of the integer trick under test."""
    q = Fraction(numerator, denominator)
    floor = q.numerator // q.denominator
    return floor + (1 if q - floor >= Fraction(1, 2) else 0)


# ---- entry signs -----------------------------------------------------------------------------


def test_every_kind_has_a_sign_rule():
    assert POSITIVE_KINDS | NEGATIVE_KINDS | {EntryKind.ADJUSTMENT} == set(EntryKind)
    assert not POSITIVE_KINDS & NEGATIVE_KINDS
    assert EntryKind.ADJUSTMENT not in POSITIVE_KINDS | NEGATIVE_KINDS


@pytest.mark.parametrize("kind", list(EntryKind))
def test_zero_amount_is_rejected_for_every_kind(kind):
    with pytest.raises(InvalidInput, match="zero"):
        check_sign(kind, 0)


@pytest.mark.parametrize("kind", sorted(POSITIVE_KINDS))
def test_positive_kinds_reject_negative_amounts(kind):
    check_sign(kind, 1)
    with pytest.raises(InvalidInput, match="positive"):
        check_sign(kind, -1)


@pytest.mark.parametrize("kind", sorted(NEGATIVE_KINDS))
def test_negative_kinds_reject_positive_amounts(kind):
    check_sign(kind, -1)
    with pytest.raises(InvalidInput, match="negative"):
        check_sign(kind, 1)


def test_adjustment_takes_either_sign():
    check_sign(EntryKind.ADJUSTMENT, 5)
    check_sign(EntryKind.ADJUSTMENT, -5)


# ---- credits repay debt first ------------------------------------------------------------------


def test_credit_without_debt_fills_the_lot():
    assert plan_credit(Debt(), 1000).lot_remaining == 1000


def test_credit_repays_debt_then_keeps_the_rest():
    repay = plan_credit(Debt(usage=300, other=200), 1000)
    assert (repay.other, repay.usage, repay.lot_remaining) == (200, 300, 500)


def test_credit_repays_other_debt_before_usage_debt():
    repay = plan_credit(Debt(usage=300, other=200), 250)
    assert (repay.other, repay.usage, repay.lot_remaining) == (200, 50, 0)


def test_credit_smaller_than_other_debt_leaves_usage_debt_untouched():
    repay = plan_credit(Debt(usage=300, other=200), 150)
    assert (repay.other, repay.usage, repay.lot_remaining) == (150, 0, 0)


def test_settlement_repays_usage_debt_only():
    repay = plan_credit(Debt(usage=300, other=200), 1000, usage_debt_only=True)
    assert (repay.other, repay.usage, repay.lot_remaining) == (0, 300, 700)


@pytest.mark.parametrize("units", [0, -1])
def test_credit_of_no_units_is_rejected(units):
    with pytest.raises(ValueError):
        plan_credit(Debt(), units)


def test_debt_total():
    assert Debt(usage=3, other=4).total == 7
    assert Debt().total == 0


# ---- draw order --------------------------------------------------------------------------------


def test_debit_draws_earliest_expiry_first_then_ties_oldest_then_no_expiry():
    lots = [
        lot("never_old", 100, days=None, seq=1),
        lot("late", 100, days=30, seq=2),
        lot("soon_new", 100, days=5, seq=4),
        lot("soon_old", 100, days=5, seq=3),
        lot("never_new", 100, days=None, seq=5),
    ]
    assert [x.id for x in drawable(lots, NOW)] == [
        "soon_old",
        "soon_new",
        "late",
        "never_old",
        "never_new",
    ]
    draw = plan_draw(lots, 350, NOW)
    assert draw.draws == (("soon_old", 100), ("soon_new", 100), ("late", 100), ("never_old", 50))
    assert draw.shortfall == 0


def test_expired_and_empty_lots_are_not_drawn():
    lots = [
        lot("expired", 100, days=-1, seq=1),
        lot("expires_now", 100, days=0, seq=2),
        lot("empty", 0, days=1, seq=3),
        lot("live", 40, days=None, seq=4),
    ]
    assert [x.id for x in drawable(lots, NOW)] == ["live"]
    draw = plan_draw(lots, 100, NOW)
    assert draw.draws == (("live", 40),)
    assert draw.shortfall == 60


def test_debit_beyond_every_lot_is_a_shortfall_not_an_error():
    draw = plan_draw([], 75, NOW)
    assert draw.draws == ()
    assert draw.shortfall == 75


def test_an_expiry_takes_its_own_lot_only():
    draw = plan_expiry(lot("bought", 50, days=-1, seq=2), 50)
    assert (draw.draws, draw.shortfall) == ((("bought", 50),), 0)


def test_a_clawback_takes_its_own_lot_even_expired_then_other_lots_then_debt():
    plan = plan_purchase_clawback(
        [ClawShare(lot("bought", 50, days=-1, seq=2), 120)],
        [lot("other", 30, days=5, seq=1), lot("bought", 50, days=-1, seq=2)], NOW)
    assert plan.draws == (("bought", 50), ("other", 30))
    assert (plan.usage_debt, plan.other_debt) == (0, 40)


def test_units_that_repaid_usage_debt_come_back_as_usage_debt_once_lots_are_gone():
    plan = plan_purchase_clawback([ClawShare(lot("bought", 0, days=None, seq=1), 50, 30)], [],
                                  NOW)
    assert plan.draws == ()
    assert (plan.usage_debt, plan.other_debt, plan.usage_returned) == (30, 20, (("bought", 30),))
    covered = plan_purchase_clawback([ClawShare(lot("bought", 0, days=None, seq=1), 50, 30)],
                                     [lot("other", 35, days=None, seq=2)], NOW)
    assert covered.draws == (("other", 35),)
    assert (covered.usage_debt, covered.other_debt) == (15, 0)


def test_a_cart_claws_back_from_each_of_its_lots():
    plan = plan_purchase_clawback(
        [ClawShare(lot("a", 10, days=None, seq=1), 10), ClawShare(lot("b", 5, days=None, seq=2),
                                                                  8)],
        [lot("c", 100, days=None, seq=3)], NOW)
    assert plan.draws == (("a", 10), ("b", 5), ("c", 3))
    assert (plan.usage_debt, plan.other_debt) == (0, 0)


def test_a_cart_lot_that_is_spent_is_covered_by_its_sibling_before_any_debt():
    """Found by the ledger property test: a dispute of a cart whose first lot is spent drew the
    shortfall from other purchases only, and left debt beside the cart's second lot."""
    plan = plan_purchase_clawback(
        [ClawShare(lot("spent", 0, days=-1, seq=1), 40),
         ClawShare(lot("live", 100, days=None, seq=2), 60)],
        [lot("other", 5, days=None, seq=3), lot("live", 100, days=None, seq=2)], NOW)
    assert plan.draws == (("live", 100),)
    assert (plan.usage_debt, plan.other_debt) == (0, 0)


def test_two_half_refunds_of_a_cart_owe_what_one_full_refund_owes():
    """Usage a lot repaid comes back as usage debt only when it becomes debt: a first half
    refund covered by the sibling lot keeps it, so the second half owes usage debt the weekly
    settlement can still forgive, exactly as one full refund would."""
    a, b = lot("a", 20, days=None, seq=1), lot("b", 100, days=None, seq=2)
    full = plan_purchase_clawback([ClawShare(a, 100, 30), ClawShare(b, 100)], [a, b], NOW)
    assert (full.usage_debt, full.other_debt) == (30, 50)
    first = plan_purchase_clawback([ClawShare(a, 50, 30), ClawShare(b, 50)], [a, b], NOW)
    assert (first.usage_debt, first.other_debt, first.usage_returned) == (0, 0, ())
    assert first.draws == (("a", 20), ("b", 80))
    a2, b2 = lot("a", 0, days=None, seq=1), lot("b", 20, days=None, seq=2)
    second = plan_purchase_clawback([ClawShare(a2, 50, 30), ClawShare(b2, 50)], [a2, b2], NOW)
    assert (second.usage_debt, second.other_debt) == (full.usage_debt, full.other_debt)
    assert second.usage_returned == (("a", 30),)


@settings(max_examples=300)
@given(remaining=st.integers(0, 10_000), units=st.integers(1, 20_000),
       others=st.lists(st.integers(0, 5_000), max_size=3), usage=st.integers(0, 20_000))
def test_a_clawback_owes_only_what_no_lot_covers(remaining, units, others, usage):
    other_lots = [lot(f"o{i}", held, days=None, seq=i + 2) for i, held in enumerate(others)]
    plan = plan_purchase_clawback(
        [ClawShare(lot("bought", remaining, days=None, seq=1), units, usage)], other_lots, NOW)
    taken = sum(u for _, u in plan.draws)
    debt = plan.usage_debt + plan.other_debt
    assert taken + debt == units
    assert debt == max(0, units - remaining - sum(others))
    assert plan.usage_debt <= min(usage, debt)
    assert sum(units for _, units in plan.usage_returned) == plan.usage_debt


@pytest.mark.parametrize("units", [0, -5])
def test_draw_of_no_units_is_rejected(units):
    with pytest.raises(ValueError):
        plan_draw([lot("a", 10, days=None, seq=1)], units, NOW)


# ---- clawback by cumulative rounding ------------------------------------------------------------


def test_full_refund_of_a_pack_claws_back_exactly_its_units():
    assert claw_sequence([PACK_CENTS]) == [PACK_UNITS]


def test_partial_refunds_add_up_exactly_in_any_order():
    for order in itertools.permutations([1633, 1633, 1634]):
        taken = claw_sequence(list(order))
        assert sum(taken) == PACK_UNITS, order
    # each step is the cumulative rounding, not the rounding of that refund alone
    assert claw_sequence([1633, 1633, 1634]) == [166_633, 166_632, 166_735]


def test_one_cent_refunds_of_a_whole_pack_add_up_exactly():
    assert sum(claw_sequence([1] * PACK_CENTS)) == PACK_UNITS


def test_clawback_never_exceeds_what_was_bought():
    assert claw_sequence([4000, 4000, 100]) == [408_163, 91_837, 0]
    assert (
        clawback_units(
            lot_units=PACK_UNITS,
            lot_price_cents=PACK_CENTS,
            clawed_cents_total=10 * PACK_CENTS,
            already_clawed=0,
        )
        == PACK_UNITS
    )


def test_clawback_rounds_half_up():
    # 1 cent of a 2-cent 1-unit lot is exactly half a unit
    assert (
        clawback_units(lot_units=1, lot_price_cents=2, clawed_cents_total=1, already_clawed=0) == 1
    )
    # 1 cent of a 3-cent 1-unit lot is a third: rounds to nothing yet
    assert (
        clawback_units(lot_units=1, lot_price_cents=3, clawed_cents_total=1, already_clawed=0) == 0
    )


def test_clawback_after_more_was_taken_takes_nothing():
    assert (
        clawback_units(lot_units=100, lot_price_cents=100, clawed_cents_total=10, already_clawed=50)
        == 0
    )


@pytest.mark.parametrize("price", [0, -1])
def test_clawback_needs_a_priced_lot(price):
    with pytest.raises(ValueError):
        clawback_units(lot_units=10, lot_price_cents=price, clawed_cents_total=1, already_clawed=0)


# ---- money -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num", "den", "expected"),
    [(0, 7, 0), (1, 2, 1), (3, 2, 2), (5, 2, 3), (1, 3, 0), (2, 3, 1), (10, 5, 2), (149, 100, 1)],
)
def test_round_half_up_div(num, den, expected):
    assert round_half_up_div(num, den) == expected


@pytest.mark.parametrize(("num", "den"), [(-1, 2), (1, 0), (1, -2)])
def test_round_half_up_div_rejects_bad_operands(num, den):
    with pytest.raises(ValueError):
        round_half_up_div(num, den)


def test_dollars_keep_what_the_caller_wrote():
    assert dollars(0.58) == Decimal("0.58")
    assert dollars(0.58) * 100 == 58
    assert dollars("0.0123") == Decimal("0.0123")
    assert dollars(3) == Decimal(3)


@pytest.mark.parametrize(
    "value", [True, False, None, "abc", float("nan"), float("inf"), "-inf", [1]]
)
def test_dollars_reject_what_is_not_a_finite_number(value):
    assert dollars(value) is None


# ---- properties of the pure rules --------------------------------------------------------------


@settings(max_examples=300)
@given(
    units=st.integers(1, 10_000_000),
    price=st.integers(1, 100_000),
    parts=st.lists(st.integers(1, 50_000), min_size=1, max_size=30),
)
def test_cumulative_clawback_equals_rounding_of_the_total(units, price, parts):
    taken = claw_sequence(parts, units=units, price=price)
    assert all(step >= 0 for step in taken)
    running = 0
    for i, step in enumerate(taken):
        running += step
        expected = min(units, exact_half_up(sum(parts[: i + 1]) * units, price))
        assert running == expected


@settings(max_examples=300)
@given(price=st.integers(1, 100_000), units=st.integers(1, 10_000_000), data=st.data())
def test_any_partition_of_the_full_price_claws_back_every_unit(price, units, data):
    cuts = (
        data.draw(st.lists(st.integers(1, price - 1), unique=True, max_size=20))
        if price > 1
        else []
    )
    bounds = [0, *sorted(cuts), price]
    parts = [b - a for a, b in itertools.pairwise(bounds)]
    assert sum(claw_sequence(parts, units=units, price=price)) == units


@settings(max_examples=500)
@given(num=st.integers(0, 10**15), den=st.integers(1, 10**9))
def test_round_half_up_div_matches_exact_rounding(num, den):
    assert round_half_up_div(num, den) == exact_half_up(num, den)


open_lots = st.lists(
    st.builds(
        OpenLot,
        id=st.uuids().map(str),
        remaining=st.integers(0, 1000),
        expires_at=st.none() | st.integers(-10, 10).map(lambda d: NOW + timedelta(days=d)),
        seq=st.integers(0, 1_000_000),
    ),
    max_size=8,
    unique_by=(lambda x: x.id, lambda x: x.seq),
)


@settings(max_examples=300)
@given(lots=open_lots, units=st.integers(1, 5000))
def test_a_draw_takes_exactly_the_units_in_draw_order(lots, units):
    draw = plan_draw(lots, units, NOW)
    by_id = {x.id: x for x in lots}
    assert sum(u for _, u in draw.draws) + draw.shortfall == units
    assert draw.shortfall >= 0
    assert len({i for i, _ in draw.draws}) == len(draw.draws)
    for lot_id, taken in draw.draws:
        assert 0 < taken <= by_id[lot_id].remaining
        assert by_id[lot_id] in drawable(lots, NOW)
    order = [x.id for x in drawable(lots, NOW)]
    drawn = [i for i, _ in draw.draws]
    assert drawn == order[: len(drawn)]
    # every lot but the last one drawn is emptied; a shortfall means every drawable lot is empty
    for lot_id, taken in draw.draws[:-1]:
        assert taken == by_id[lot_id].remaining
    if draw.shortfall:
        assert len(drawn) == len(order)
        assert all(taken == by_id[i].remaining for i, taken in draw.draws)


@settings(max_examples=300)
@given(
    usage=st.integers(0, 10_000),
    other=st.integers(0, 10_000),
    units=st.integers(1, 30_000),
    settlement=st.booleans(),
)
def test_a_credit_splits_between_debt_and_lot(usage, other, units, settlement):
    repay = plan_credit(Debt(usage=usage, other=other), units, usage_debt_only=settlement)
    assert repay.other + repay.usage + repay.lot_remaining == units
    assert 0 <= repay.other <= other
    assert 0 <= repay.usage <= usage
    assert repay.lot_remaining >= 0
    if settlement:
        assert repay.other == 0
    elif repay.usage:
        assert repay.other == other  # other debt is repaid first
    if repay.lot_remaining:
        assert repay.usage == usage
        assert settlement or repay.other == other
