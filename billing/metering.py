"""The metering rules (SPEC §5.2, §5.3), pure: no database, no clock.

Units from dollar costs, the overflow a usage record makes, which alerts it raises, the quota
gate and the weekly settlement. `billing.store.meters` applies them in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Annotated, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    model_validator,
)

from billing.config import BillingConfig, MeterConfig, PlanConfig
from billing.money import dollars

RECORDED = "recorded"
ZERO_COST = "zero_cost"

#: Statuses in which the organization gets the default plan whatever it subscribed to.
DEFAULT_PLAN_STATUSES = frozenset(
    {"paused", "unpaid", "incomplete", "incomplete_expired", "canceled"}
)

#: Balance alerts of quota-0 plans, in percent of the signup grant, deepest last.
GRANT_ALERT_PERCENTS = (20, 0)

METER_EXHAUSTED = "METER_EXHAUSTED"
PAYMENT_PAST_DUE = "PAYMENT_PAST_DUE"

OrgId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
#: No `:` in a run id, so the ledger key `usage:<run_id>:<step>` names exactly one record.
RUN_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)]
Step = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9:_-]{1,64}$")]
#: Cost keys become field names of the stored breakdown: no `.` or `$`.
CostKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
#: A decimal string is accepted for exactness, not for range: beyond a float's range it would
#: overflow the unit conversion.
MAX_COST = Decimal("1.8e308")
Cost = StrictInt | StrictFloat | Annotated[Decimal, Field(ge=-MAX_COST, le=MAX_COST)]
#: Stored as given on the usage record (the count itself is capped at `max_units_per_operation`).
MAX_UNITS = 2**63 - 1


class _Priced(Protocol):
    @property
    def costs(self) -> object: ...

    @property
    def units(self) -> object: ...


PricedT = TypeVar("PricedT", bound=_Priced)


def costs_or_units(model: PricedT) -> PricedT:
    """The validator of every request priced as usage (a record, a hold): dollar `costs` or
    `units`, never both (a 422)."""
    if model.costs is not None and model.units is not None:
        raise ValueError("give either costs or units, not both")
    return model


class UsageRequest(BaseModel):
    """One usage record (`POST /v1/usage`): dollar `costs` (null: a run with no costs) or
    `units` measured by the caller, never both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org_id: OrgId
    run_id: RunId
    step: Step = "initial"
    costs: dict[CostKey, Cost] | None = Field(default=None, max_length=64)
    units: StrictInt | None = Field(default=None, ge=0, le=MAX_UNITS)
    hold_id: RunId | None = Field(
        default=None, description="the hold this run reserved (SPEC §5.11): the record settles "
                                  "it in the same transaction; an unknown, expired or settled "
                                  "hold changes nothing and the record is counted all the same")

    _costs_or_units = model_validator(mode="after")(costs_or_units)


@dataclass(frozen=True)
class Metered:
    """Units of one usage record and how they split over the cost keys."""

    units: int
    breakdown: dict[str, int]
    result: str = RECORDED
    capped: bool = False


def cap_breakdown(breakdown: Mapping[str, int], cap: int) -> dict[str, int]:
    """Scale buckets down so they sum to `cap`: floors first, then one unit of the remainder to
    each of the largest buckets (ties by key), so the result always sums exactly to `cap`."""
    total = sum(breakdown.values())
    if total <= cap:
        return dict(breakdown)
    scaled = {key: units * cap // total for key, units in breakdown.items()}
    left = cap - sum(scaled.values())
    for key in sorted(breakdown, key=lambda k: (-breakdown[k], k))[:left]:
        scaled[key] += 1
    return scaled


def _metered(breakdown: dict[str, int], meter: MeterConfig) -> Metered:
    capped = cap_breakdown(breakdown, meter.max_units_per_operation)
    return Metered(units=sum(capped.values()), breakdown=capped, capped=capped != breakdown)


def units_from_costs(
    costs: Mapping[str, object] | None, plan: PlanConfig, meter: MeterConfig
) -> Metered:
    """SPEC §5.2: `null` -> `run_base_units`; no positive finite cost -> 0 units (`zero_cost`);
    else the sum of `floor(Decimal(str(cost)) * ratio * dollars_to_units)`, capped."""
    if costs is None:
        return _metered({"base": meter.run_base_units}, meter)
    breakdown: dict[str, int] = {}
    for key, value in costs.items():
        amount = dollars(value)
        if amount is None or amount <= 0:
            continue
        units = amount * plan.ratio(key) * meter.dollars_to_units
        breakdown[key] = int(units.to_integral_value(rounding=ROUND_FLOOR))
    if not breakdown:
        return Metered(units=0, breakdown={}, result=ZERO_COST)
    return _metered(breakdown, meter)


def meter_usage(request: UsageRequest, plan: PlanConfig, meter: MeterConfig) -> Metered:
    """Units of a request: given `units` are capped like computed ones."""
    if request.units is not None:
        return _metered({"units": request.units}, meter)
    return units_from_costs(request.costs, plan, meter)


def overflow(prev_used: int, new_used: int, quota: int) -> int:
    """Units of a record beyond the live quota: all of them when the quota is 0."""
    if quota <= 0:
        return new_used - prev_used
    if new_used <= quota:
        return 0
    return new_used - max(prev_used, quota)


def thresholds_crossed(
    prev_used: int, new_used: int, quota: int, thresholds: tuple[int, ...]
) -> list[int]:
    """Percent thresholds of the quota reached by going from `prev_used` to `new_used`."""
    if quota <= 0:
        return []
    return [pct for pct in thresholds if prev_used * 100 < pct * quota <= new_used * 100]


def grant_alert(prev_balance: int, new_balance: int, grant: int) -> int | None:
    """The deepest grant level (percent) a debit took the balance to or below, if any."""
    if grant <= 0:
        return None
    for pct in reversed(GRANT_ALERT_PERCENTS):
        level = grant * pct // 100
        if prev_balance > level >= new_balance:
            return pct
    return None


def is_runaway(balance: int, quota: int, factor: int) -> bool:
    return quota > 0 and balance < -factor * quota


def plan_quota(plan: PlanConfig, seats: int) -> int:
    """The weekly quota of `plan` for an organization paying for `seats` (SPEC 5.4): a
    `per_seat` plan multiplies its `meter_quota` by the seats (5 seats of a 50000-unit plan:
    250000), any other plan ignores them."""
    return plan.meter_quota * max(seats, 1) if plan.per_seat else plan.meter_quota


def effective_plan(config: BillingConfig, plan_id: str | None, status: str | None) -> PlanConfig:
    """The plan an organization is metered on: its own, or the default one while its
    subscription is in a status that does not pay for a plan."""
    if status in DEFAULT_PLAN_STATUSES:
        return config.default_plan
    return config.plan(plan_id)


@dataclass(frozen=True)
class Gate:
    allowed: bool
    remaining: int
    reason: str | None
    held: int = 0


def quota_gate(
    *,
    quota: int,
    used: int,
    balance: int,
    status: str | None,
    past_due_since: datetime | None,
    grace_days: int,
    now: datetime,
    held: int = 0,
) -> Gate:
    """SPEC §5.2: `remaining = max(0, quota - used) + balance - held` (§5.11: the units active
    holds reserve); a payment past due for longer than `grace_days` blocks first, then an
    exhausted meter."""
    remaining = max(0, quota - used) + balance - held
    if (
        status == "past_due"
        and past_due_since is not None
        and now - past_due_since > timedelta(days=grace_days)
    ):
        return Gate(allowed=False, remaining=remaining, reason=PAYMENT_PAST_DUE, held=held)
    if remaining <= 0:
        return Gate(allowed=False, remaining=remaining, reason=METER_EXHAUSTED, held=held)
    return Gate(allowed=True, remaining=remaining, reason=None, held=held)


def settlement_units(*, quota: int, used: int, usage_debt: int) -> int:
    """Usage debt the new week's quota repays (SPEC §5.3): at most the quota the week has left,
    which is all of it when the reset opens the week."""
    return max(0, min(quota - used, usage_debt))
