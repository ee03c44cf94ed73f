"""The hold rules of SPEC §5.11, pure: what is held at a moment, and which holds are granted."""

from __future__ import annotations

import doctest
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from billing import holds as holds_module
from billing.holds import (
    DEFAULT_TTL_SECONDS,
    INSUFFICIENT_UNITS,
    Hold,
    HoldRequest,
    Refusal,
    decide_hold,
    held,
)
from billing.metering import METER_EXHAUSTED, PAYMENT_PAST_DUE, Gate, quota_gate

T = datetime(2026, 5, 6, 12, 0, tzinfo=UTC)


def gate(remaining: int, reason: str | None = None) -> Gate:
    return Gate(allowed=reason is None and remaining > 0, remaining=remaining, reason=reason)


def test_worked_examples_in_docstrings_hold() -> None:
    assert doctest.testmod(holds_module).failed == 0


def test_a_hold_counts_until_it_expires_and_not_at_its_expiry() -> None:
    hold = Hold("h", 75, T + timedelta(seconds=900), 425)
    assert held([hold], T) == 75
    assert held([hold], T + timedelta(seconds=899)) == 75
    assert held([hold], T + timedelta(seconds=900)) == 0
    assert held([], T) == 0


def test_a_hold_is_granted_when_the_remaining_covers_it_exactly() -> None:
    granted = decide_hold(gate(75), hold_id="h", units=75, ttl_seconds=60, now=T)
    assert granted == Hold("h", 75, T + timedelta(seconds=60), 0)
    assert decide_hold(gate(74), hold_id="h", units=75, ttl_seconds=60, now=T) == Refusal(
        INSUFFICIENT_UNITS, 74)
    assert decide_hold(gate(-20, METER_EXHAUSTED), hold_id="h", units=1, ttl_seconds=60,
                       now=T) == Refusal(INSUFFICIENT_UNITS, -20)


def test_a_payment_past_due_refuses_any_hold() -> None:
    assert decide_hold(gate(10_000, PAYMENT_PAST_DUE), hold_id="h", units=1, ttl_seconds=60,
                       now=T) == Refusal(PAYMENT_PAST_DUE, 10_000)


def test_the_gate_subtracts_what_is_held() -> None:
    args = {"quota": 100, "used": 40, "balance": 500, "status": None, "past_due_since": None,
            "grace_days": 7, "now": T}
    assert quota_gate(**args, held=0) == Gate(True, 560, None, 0)  # type: ignore[arg-type]
    assert quota_gate(**args, held=560) == Gate(  # type: ignore[arg-type]
        False, 0, METER_EXHAUSTED, 560)


@given(remaining=st.integers(-1_000, 1_000), asks=st.lists(st.integers(0, 300), max_size=30))
def test_granting_in_turn_never_holds_more_than_was_remaining(remaining: int,
                                                              asks: list[int]) -> None:
    """Each grant sees the holds before it: together they never exceed the first remaining."""
    granted: list[Hold] = []
    for i, units in enumerate(asks):
        left = remaining - held(granted, T)
        decided = decide_hold(gate(left), hold_id=f"h{i}", units=units, ttl_seconds=60, now=T)
        if isinstance(decided, Hold):
            assert decided.remaining == left - units >= 0
            granted.append(decided)
        else:
            assert units > left
    assert held(granted, T) <= max(remaining, 0)


def test_the_request_takes_units_or_costs_and_a_bounded_ttl() -> None:
    assert HoldRequest(hold_id="run-1").ttl_seconds == DEFAULT_TTL_SECONDS
    assert HoldRequest.model_validate({"hold_id": "run-1", "costs": {"llm": 0.5}}).units is None
    for bad in ({"hold_id": "run 1", "units": 1}, {"hold_id": "r:1", "units": 1},
                {"hold_id": "r", "units": -1}, {"hold_id": "r", "units": "5"},
                {"hold_id": "r", "units": 1, "costs": {"llm": 1}},
                {"hold_id": "r", "ttl_seconds": 0}, {"hold_id": "r", "ttl_seconds": 86_401},
                {"hold_id": "r", "other": 1}, {"units": 1}):
        with pytest.raises(ValidationError):
            HoldRequest.model_validate(bad)
    assert HoldRequest(hold_id="r", ttl_seconds=86_400).ttl_seconds == 86_400
