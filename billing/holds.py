"""Balance holds (SPEC §5.11), pure: what a hold reserves, what is held at a moment, whether a
hold may be granted, and which weeks' meters may keep an active one. `billing.store.meters` reads,
calls these and writes in one transaction.

A hold counts while `now < expires_at` and it is neither settled nor released: expiry needs no
write, so nothing has to run for an expired hold to stop counting.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from billing.metering import (
    MAX_UNITS,
    PAYMENT_PAST_DUE,
    Cost,
    CostKey,
    Gate,
    RunId,
    costs_or_units,
)
from billing.weeks import iso_week, previous_week

INSUFFICIENT_UNITS = "INSUFFICIENT_UNITS"
DEFAULT_TTL_SECONDS = 900
MAX_TTL_SECONDS = 86_400


class HoldRequest(BaseModel):
    """`POST /v1/orgs/{org}/holds`: reserve `units`, or what `costs` would meter as usage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hold_id: RunId = Field(description="the hold's idempotency key (the `run_id` pattern); "
                                       "the same id again answers the first answer")
    units: StrictInt | None = Field(default=None, ge=0, le=MAX_UNITS,
                                    description="units to reserve")
    costs: dict[CostKey, Cost] | None = Field(
        default=None, max_length=64,
        description="dollar costs priced as a usage record would be (instead of `units`)")
    ttl_seconds: StrictInt = Field(default=DEFAULT_TTL_SECONDS, ge=1, le=MAX_TTL_SECONDS,
                                   description="the hold stops counting this long after it "
                                               "is granted")

    _costs_or_units = model_validator(mode="after")(costs_or_units)


@dataclass(frozen=True)
class Reservation:
    """What a hold reserves until it is settled, released or expires."""

    hold_id: str
    units: int
    expires_at: datetime

    def active(self, now: datetime) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class Hold(Reservation):
    """A granted hold, as its grant answered: `remaining` is what the organization had left once
    it was granted."""

    remaining: int

    def reservation(self) -> Reservation:
        return Reservation(self.hold_id, self.units, self.expires_at)


def held(holds: Iterable[Reservation], now: datetime) -> int:
    """Units reserved at `now` by holds neither settled nor released: the expired ones count
    for nothing.

    >>> from datetime import UTC
    >>> t = datetime(2026, 5, 6, tzinfo=UTC)
    >>> held([Hold("a", 75, t + timedelta(seconds=1), 0), Hold("b", 20, t, 0)], t)
    75
    """
    return sum(hold.units for hold in holds if hold.active(now))


def weeks_holding(now: datetime) -> list[str]:
    """The weeks whose meters may keep a hold that is active at `now`: a hold is kept on the
    meter of the week it was granted in and lives at most `MAX_TTL_SECONDS`, so last week's
    holds can count only during this week's first `MAX_TTL_SECONDS`.

    >>> weeks_holding(datetime(2026, 5, 4, 23, 59, tzinfo=UTC))  # a Monday
    ['2026-W19', '2026-W18']
    >>> weeks_holding(datetime(2026, 5, 5, tzinfo=UTC))
    ['2026-W19']
    """
    week = iso_week(now)
    utc = now.astimezone(UTC) if now.tzinfo is not None else now
    since_monday = utc - datetime.combine(utc.date() - timedelta(days=utc.weekday()), time(),
                                          utc.tzinfo)
    if since_monday < timedelta(seconds=MAX_TTL_SECONDS):
        return [week, previous_week(week)]
    return [week]


@dataclass(frozen=True)
class Refusal:
    """Why a hold is refused: `INSUFFICIENT_UNITS` or `PAYMENT_PAST_DUE`, and what is left."""

    code: str
    remaining: int


def decide_hold(gate: Gate, *, hold_id: str, units: int, ttl_seconds: int,
                now: datetime) -> Hold | Refusal:
    """Grant `units` when the gate's `remaining` (which already nets every active hold) covers
    them; a payment past its grace refuses any hold, as the gate refuses any run.

    >>> from datetime import UTC
    >>> t = datetime(2026, 5, 6, tzinfo=UTC)
    >>> open_gate = Gate(allowed=True, remaining=125, reason=None, held=375)
    >>> decide_hold(open_gate, hold_id="r1", units=75, ttl_seconds=900, now=t)
    Hold(hold_id='r1', units=75, expires_at=datetime.datetime(2026, 5, 6, 0, 15, \
tzinfo=datetime.timezone.utc), remaining=50)
    >>> decide_hold(open_gate, hold_id="r2", units=126, ttl_seconds=900, now=t)
    Refusal(code='INSUFFICIENT_UNITS', remaining=125)
    """
    if gate.reason == PAYMENT_PAST_DUE:
        return Refusal(PAYMENT_PAST_DUE, gate.remaining)
    if units > gate.remaining:
        return Refusal(INSUFFICIENT_UNITS, gate.remaining)
    expires_at = now + timedelta(seconds=ttl_seconds)
    # to the millisecond, as MongoDB stores it: a repeated `hold_id` answers exactly this
    expires_at = expires_at.replace(microsecond=expires_at.microsecond // 1000 * 1000)
    return Hold(hold_id, units, expires_at, gate.remaining - units)
