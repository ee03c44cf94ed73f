"""The automatic top-up decisions of `billing.auto_topup` (SPEC §5.8), on plain data."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.auto_topup import (
    FAILURES_BEFORE_PAUSE,
    AutoTopUp,
    configured,
    failed,
    month_of,
    should_trigger,
    succeeded,
    triggered,
    workflow_id,
)

MAY = "2026-05"
ON = AutoTopUp(enabled=True, pack_id="pack_500k", below_units=1000, max_per_month=2)


def trigger(state: AutoTopUp, before: int, after: int, month: str = MAY) -> bool:
    return should_trigger(state, balance_before=before, balance_after=after, month=month)


def test_a_write_crossing_the_threshold_triggers() -> None:
    assert trigger(ON, 1000, 999)
    assert trigger(ON, 5000, -20)


def test_a_write_that_stays_above_or_raises_the_balance_does_not() -> None:
    assert not trigger(ON, 5000, 1000)
    assert not trigger(ON, 500, 700)  # a credit while below
    assert not trigger(ON, 500, 500)


def test_a_lowering_write_while_below_triggers_when_none_is_in_flight() -> None:
    assert trigger(ON, 500, 490)
    assert not trigger(replace(ON, in_flight="auto-topup-acme-1"), 500, 490)


@pytest.mark.parametrize("state", [
    replace(ON, enabled=False), replace(ON, paused=True), replace(ON, pack_id=None),
    replace(ON, month=MAY, this_month=2), replace(ON, max_per_month=0), AutoTopUp(),
])
def test_no_trigger_when_disabled_paused_unset_or_capped(state: AutoTopUp) -> None:
    assert not trigger(state, 1000, 999)


def test_the_cap_counts_the_calendar_month_utc() -> None:
    capped = replace(ON, month="2026-04", this_month=2)
    assert not trigger(capped, 1000, 999, month="2026-04")
    assert trigger(capped, 1000, 999, month=MAY)
    assert month_of(datetime(2026, 5, 31, 23, 59, tzinfo=UTC)) == MAY
    assert month_of(datetime(2026, 6, 1, 0, 0, tzinfo=UTC)) == "2026-06"


def test_a_trigger_numbers_the_workflow_and_counts_in_its_month() -> None:
    first = triggered(replace(ON, month="2026-04", this_month=2, triggers=7), "acme", MAY)
    assert (first.in_flight, first.triggers, first.month, first.this_month) == (
        "auto-topup-acme-8", 8, MAY, 1)
    assert workflow_id("acme", 8) == "auto-topup-acme-8"
    done = succeeded(replace(first, failures=2))
    assert (done.in_flight, done.failures, done.this_month) == (None, 0, 1)


def test_three_failures_in_a_row_pause_and_give_their_place_in_the_month_back() -> None:
    state = ON
    for n in range(1, FAILURES_BEFORE_PAUSE + 1):
        state = failed(triggered(state, "acme", MAY), MAY)
        assert (state.failures, state.this_month, state.in_flight) == (n, 0, None)
        assert state.paused is (n == FAILURES_BEFORE_PAUSE)
    assert not trigger(state, 500, 400)
    resumed = configured(state, enabled=True, pack_id="pack_500k", below_units=1000,
                         max_per_month=2)
    assert (resumed.paused, resumed.failures) == (False, 0)
    assert trigger(resumed, 500, 400)


def test_a_success_ends_the_streak() -> None:
    state = failed(triggered(ON, "acme", MAY), MAY)
    state = succeeded(triggered(state, "acme", MAY))
    state = failed(triggered(state, "acme", MAY), MAY)
    assert (state.failures, state.paused) == (1, False)


def test_a_failure_of_last_month_keeps_this_months_count() -> None:
    state = triggered(replace(ON, month="2026-04"), "acme", "2026-04")
    state = replace(state, month=MAY, this_month=1)  # another top-up counted in May since
    assert failed(state, "2026-04").this_month == 1


def test_disabling_keeps_the_pause_and_the_counters() -> None:
    state = replace(ON, paused=True, failures=3, this_month=1, month=MAY, triggers=4)
    off = configured(state, enabled=False, pack_id="pack_500k", below_units=10, max_per_month=1)
    assert (off.enabled, off.paused, off.failures, off.triggers, off.below_units) == (
        False, True, 3, 4, 10)


def test_from_doc_reads_what_the_store_writes() -> None:
    assert AutoTopUp.from_doc(None) == AutoTopUp()
    assert AutoTopUp.from_doc({"enabled": True, "pack_id": "p", "triggers": 3}) == AutoTopUp(
        enabled=True, pack_id="p", triggers=3)


@given(writes=st.lists(st.integers(-5000, 5000), max_size=40),
       outcomes=st.lists(st.booleans(), max_size=40))
def test_at_most_one_in_flight_and_never_over_the_cap(writes: list[int],
                                                      outcomes: list[bool]) -> None:
    """Writes interleaved with top-up outcomes: a trigger only while none is in flight, and
    succeeded plus in-flight top-ups of the month never exceed the cap."""
    state, balance, results = ON, 0, iter(outcomes)
    for amount in writes:
        after = balance + amount
        if trigger(state, balance, after):
            assert state.in_flight is None
            state = triggered(state, "acme", MAY)
        balance = after
        if state.in_flight is not None:
            result = next(results, None)
            if result is not None:
                state = succeeded(state) if result else failed(state, MAY)
        assert state.count_in(MAY) <= state.max_per_month
