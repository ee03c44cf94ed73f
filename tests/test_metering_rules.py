"""Unit tests of the pure metering rules (`billing.metering`) and ISO weeks (`billing.weeks`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from billing.config import BillingConfig
from billing.metering import (
    METER_EXHAUSTED,
    PAYMENT_PAST_DUE,
    ZERO_COST,
    UsageRequest,
    cap_breakdown,
    effective_plan,
    grant_alert,
    is_runaway,
    meter_usage,
    overflow,
    quota_gate,
    settlement_units,
    thresholds_crossed,
    units_from_costs,
)
from billing.weeks import iso_week, next_week, week_start

NOW = datetime(2026, 5, 6, 12, 0, tzinfo=UTC)


def test_units_from_costs_spec_example(config: BillingConfig) -> None:
    pro = config.plans_by_id["pro"]
    metered = units_from_costs({"llm": 0.0123, "search": 0.002}, pro, config.meter)
    assert metered.units == 26
    assert metered.breakdown == {"llm": 24, "search": 2}


def test_null_costs_charge_the_run_base(config: BillingConfig) -> None:
    metered = units_from_costs(None, config.default_plan, config.meter)
    assert metered.units == config.meter.run_base_units == 1
    assert metered.result != ZERO_COST


@pytest.mark.parametrize("costs", [{"a": 0}, {}, {"a": -1.5, "b": 0.0}, {"a": float("nan")},
                                   {"a": float("inf")}])
def test_no_positive_finite_cost_is_zero_cost(
    config: BillingConfig, costs: dict[str, float]
) -> None:
    metered = units_from_costs(costs, config.default_plan, config.meter)
    assert (metered.units, metered.result, metered.breakdown) == (0, ZERO_COST, {})


def test_cap_rescales_the_breakdown(config: BillingConfig) -> None:
    metered = units_from_costs({"a": 15}, config.default_plan, config.meter)
    assert metered.units == 10000 and metered.breakdown == {"a": 10000} and metered.capped
    mixed = units_from_costs({"a": 10, "b": 5, "c": 5}, config.default_plan, config.meter)
    # 10000 : 5000 : 5000 scaled to 10000 -> 5000, 2500, 2500
    assert mixed.breakdown == {"a": 5000, "b": 2500, "c": 2500}


def test_cap_gives_the_remainder_to_the_largest_buckets() -> None:
    assert cap_breakdown({"a": 7, "b": 7, "c": 7}, 10) == {"a": 4, "b": 3, "c": 3}
    assert cap_breakdown({"x": 1, "y": 5, "z": 3}, 4) == {"x": 0, "y": 3, "z": 1}
    assert cap_breakdown({"a": 3}, 10) == {"a": 3}


@given(st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(0, 10**6),
                       min_size=1, max_size=8), st.integers(1, 10**5))
def test_cap_always_sums_to_the_cap(breakdown: dict[str, int], cap: int) -> None:
    capped = cap_breakdown(breakdown, cap)
    assert sum(capped.values()) == min(cap, sum(breakdown.values()))
    assert all(0 <= capped[k] <= breakdown[k] for k in breakdown)


def test_dollars_go_through_str_never_float_math(config: BillingConfig) -> None:
    assert units_from_costs({"a": 0.58}, config.default_plan, config.meter).units == 580
    assert units_from_costs({"a": Decimal("0.58")}, config.default_plan, config.meter).units == 580
    assert units_from_costs({"a": 0.0009}, config.default_plan, config.meter).units == 0


def test_ratio_falls_back_to_default_then_one(config: BillingConfig) -> None:
    plan = config.plans_by_id["pro"].model_copy(update={"ratios": {"default": Decimal("0.5")}})
    assert units_from_costs({"llm": 1, "x": 1}, plan, config.meter).units == 1000


def test_given_units_are_capped_too(config: BillingConfig) -> None:
    request = UsageRequest(org_id="o", run_id="r", units=20000)
    assert meter_usage(request, config.default_plan, config.meter).units == 10000


@pytest.mark.parametrize(
    ("day", "week"),
    [(datetime(2026, 1, 1), "2026-W01"), (datetime(2024, 12, 30), "2025-W01"),
     (datetime(2027, 1, 1), "2026-W53"), (datetime(2026, 5, 11, 0, 0, tzinfo=UTC), "2026-W20"),
     (datetime(2026, 5, 10, 23, 59, 59, tzinfo=UTC), "2026-W19")],
)
def test_iso_weeks(day: datetime, week: str) -> None:
    assert iso_week(day) == week


def test_weeks_start_monday_utc() -> None:
    assert week_start("2026-W20") == datetime(2026, 5, 11, tzinfo=UTC)
    assert next_week("2026-W53") == "2027-W01"


@pytest.mark.parametrize(
    ("prev", "new", "quota", "expected"),
    [(90, 120, 100, 20), (0, 50, 100, 0), (100, 130, 100, 30), (120, 150, 100, 30),
     (0, 40, 0, 40), (10, 10, 100, 0)],
)
def test_overflow(prev: int, new: int, quota: int, expected: int) -> None:
    assert overflow(prev, new, quota) == expected


def test_thresholds_crossed() -> None:
    assert thresholds_crossed(0, 90, 100, (80, 100)) == [80]
    assert thresholds_crossed(90, 120, 100, (80, 100)) == [100]
    assert thresholds_crossed(0, 100, 100, (80, 100)) == [80, 100]
    assert thresholds_crossed(100, 150, 100, (80, 100)) == []
    assert thresholds_crossed(0, 50, 0, (80, 100)) == []


def test_grant_alert_reports_the_deepest_crossing_only() -> None:
    assert grant_alert(500, 400, 500) is None
    assert grant_alert(400, 100, 500) == 20
    assert grant_alert(100, 50, 500) is None
    assert grant_alert(100, 0, 500) == 0
    assert grant_alert(500, -10, 500) == 0
    assert grant_alert(500, -10, 0) is None


def test_runaway() -> None:
    assert is_runaway(-1001, 100, 10)
    assert not is_runaway(-1000, 100, 10)
    assert not is_runaway(-10**9, 0, 10)


def test_status_that_does_not_pay_meters_on_the_default_plan(config: BillingConfig) -> None:
    assert effective_plan(config, "pro", "active").id == "pro"
    assert effective_plan(config, "pro", "past_due").id == "pro"
    assert effective_plan(config, "pro", None).id == "pro"
    for status in ("paused", "unpaid", "incomplete", "incomplete_expired", "canceled"):
        assert effective_plan(config, "pro", status).id == "free"


def _gate(**overrides: object) -> tuple[bool, int, str | None]:
    args: dict[str, object] = {"quota": 100, "used": 30, "balance": 0, "status": "active",
                               "past_due_since": None, "grace_days": 7, "now": NOW}
    args.update(overrides)
    gate = quota_gate(**args)  # type: ignore[arg-type]
    return gate.allowed, gate.remaining, gate.reason


def test_gate_remaining_is_quota_left_plus_balance() -> None:
    assert _gate() == (True, 70, None)
    assert _gate(used=150, balance=20) == (True, 20, None)
    assert _gate(used=150, balance=-5) == (False, -5, METER_EXHAUSTED)
    assert _gate(quota=0, used=0, balance=0) == (False, 0, METER_EXHAUSTED)
    assert _gate(used=100, balance=0) == (False, 0, METER_EXHAUSTED)


def test_gate_blocks_past_due_beyond_grace_days() -> None:
    assert _gate(status="past_due", past_due_since=NOW - timedelta(days=6)) == (True, 70, None)
    assert _gate(status="past_due", past_due_since=NOW - timedelta(days=8)) == (
        False, 70, PAYMENT_PAST_DUE)
    assert _gate(status="active", past_due_since=NOW - timedelta(days=30))[0]


def test_settlement_is_bounded_by_the_quota_left_and_the_usage_debt() -> None:
    assert settlement_units(quota=100, used=0, usage_debt=30) == 30
    assert settlement_units(quota=100, used=0, usage_debt=300) == 100
    assert settlement_units(quota=100, used=80, usage_debt=300) == 20
    assert settlement_units(quota=0, used=0, usage_debt=30) == 0
    assert settlement_units(quota=100, used=150, usage_debt=30) == 0


def test_usage_request_validation() -> None:
    assert UsageRequest(org_id="acme", run_id="r1").step == "initial"
    UsageRequest(org_id="acme", run_id="r1", step="retry:2_a-b", costs={"llm": 0.1})
    bad: list[dict[str, object]] = [
        {"org_id": "acme", "run_id": "r1", "step": "bad step"},
        {"org_id": "acme", "run_id": "r1", "step": "x" * 65},
        {"org_id": "acme", "run_id": "r:1"},
        {"org_id": "ac me", "run_id": "r1"},
        {"org_id": "acme", "run_id": "r1", "costs": {"a": 1}, "units": 3},
        {"org_id": "acme", "run_id": "r1", "units": -1},
        {"org_id": "acme", "run_id": "r1", "units": True},
        {"org_id": "acme", "run_id": "r1", "costs": {"a": "lots"}},
        {"org_id": "acme", "run_id": "r1", "costs": {"$where": 1}},
        {"org_id": "acme", "run_id": "r1", "cost": {"a": 1}},
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            UsageRequest.model_validate(body)
