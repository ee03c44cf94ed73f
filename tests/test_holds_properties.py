"""Property test of balance holds on the real database (SPEC §5.11): random histories of holds
(alone and in concurrent bursts), settlements by usage, releases, expiries on a controlled clock,
replays and plain usage, against a model.

Whatever the history: the active holds never exceed what was remaining when each was granted,
every grant and refusal is the one the model expects, the gate's `held` is the model's, and every
usage record is counted (never refused, never lost)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter_helpers import usage

from billing.config import BillingConfig
from billing.holds import INSUFFICIENT_UNITS, Hold, HoldRequest, Refusal
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.holds import release
from billing.store.meters import Meters

SIGNUP_GRANT = 500  # the free plan: quota 0, every unit from the grant

Op = tuple[str, int, int]

pick, none = st.integers(0, 1_000), st.just(0)
#: (kind, a, b): a hold of `a` units for `b` seconds (weighs double), `a` concurrent holds of `b`
#: units, usage of `b` units settling hold number `a`, releasing or asking again for hold `a`,
#: `a` seconds passing, plain usage of `a` units.
ops = st.one_of(
    st.tuples(st.just("hold"), st.integers(0, 300), st.integers(1, 600)),
    st.tuples(st.just("hold"), st.integers(0, 300), st.integers(1, 600)),
    st.tuples(st.just("burst"), st.integers(2, 8), st.integers(1, 150)),
    st.tuples(st.just("settle"), pick, st.integers(0, 200)),
    st.tuples(st.just("release"), pick, none),
    st.tuples(st.just("replay"), pick, none),
    st.tuples(st.just("advance"), st.integers(1, 400), none),
    st.tuples(st.just("usage"), st.integers(0, 200), none),
)


@dataclass
class Model:
    """What the organization should look like: usage counted, and each granted hold."""

    now: datetime
    used: int = 0
    records: int = 0
    holds: dict[str, Hold] = field(default_factory=dict)
    settled_or_released: set[str] = field(default_factory=set)

    def counts(self, hold_id: str) -> bool:
        return (hold_id not in self.settled_or_released
                and self.now < self.holds[hold_id].expires_at)

    def held(self) -> int:
        return sum(h.units for h in self.holds.values() if self.counts(h.hold_id))

    def remaining(self) -> int:
        return SIGNUP_GRANT - self.used - self.held()

    def pick(self, index: int) -> str | None:
        return list(self.holds)[index % len(self.holds)] if self.holds else None


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=st.lists(ops, min_size=5, max_size=30))
async def test_random_histories_never_overcommit_or_lose_usage(
    history: list[Op], db: Database, meter_config: BillingConfig,
    accounts: Accounts, now: datetime,
) -> None:
    org = f"holds-{uuid.uuid4().hex[:12]}"
    await accounts.register(org, now)
    meters = Meters(db, meter_config)
    model = Model(now)
    asked = 0

    async def grant(units: int, ttl: int, via: Meters = meters) -> Hold | Refusal:
        nonlocal asked
        asked += 1
        return await via.hold(org, HoldRequest(hold_id=f"h{asked}", units=units,
                                               ttl_seconds=ttl), model.now)

    def granted(result: Hold | Refusal, available: int) -> None:
        """A grant's answer: the remaining it leaves is what was available less its units."""
        if isinstance(result, Hold):
            assert result.remaining == available - result.units >= 0
            assert result.expires_at > model.now
            model.holds[result.hold_id] = result
            # the active holds never exceed what was remaining before any of them
            assert model.held() <= SIGNUP_GRANT - model.used
        else:
            assert result.code == INSUFFICIENT_UNITS

    for kind, a, b in history:
        if kind == "hold":
            available = model.remaining()
            result = await grant(a, b)
            assert isinstance(result, Hold) == (a <= available), (kind, a, b, available, result)
            granted(result, available)
        elif kind == "burst":
            # concurrent grants, half through this process's group commit, half as if each
            # came from a process of its own (only MongoDB orders those)
            available = model.remaining()
            results = await asyncio.gather(*(
                grant(b, 300, meters if i % 2 else Meters(db, meter_config)) for i in range(a)))
            wins = sorted((r for r in results if isinstance(r, Hold)),
                          key=lambda r: -r.remaining)
            assert len(wins) == min(a, max(available, 0) // b), (a, b, available, results)
            for k, win in enumerate(wins):
                granted(win, available - k * b)
            assert all(r.remaining == available - len(wins) * b
                       for r in results if isinstance(r, Refusal))
        elif kind == "settle" and (hold_id := model.pick(a)) is not None:
            model.records += 1
            request = usage(org, f"run{model.records}", units=b, hold_id=hold_id)
            assert (await meters.record(request, model.now)).applied
            model.used += b
            if model.counts(hold_id):
                model.settled_or_released.add(hold_id)
        elif kind == "release" and (hold_id := model.pick(a)) is not None:
            assert await release(db, org, hold_id, model.now) == model.counts(hold_id)
            model.settled_or_released.add(hold_id)
        elif kind == "replay" and (hold_id := model.pick(a)) is not None:
            again = HoldRequest(hold_id=hold_id, units=1)
            assert await meters.hold(org, again, model.now) == model.holds[hold_id]
        elif kind == "advance":
            model.now += timedelta(seconds=a)
        elif kind == "usage":
            model.records += 1
            assert (await meters.record(usage(org, f"run{model.records}", units=a),
                                        model.now)).applied
            model.used += a

        gate = await meters.gate(org, model.now)
        assert (gate.held, gate.remaining) == (model.held(), model.remaining()), (kind, a, b)
    view = await meters.current(org, model.now)
    assert view.used == model.used
    assert await db.usage.count_documents({"org_id": org}) == model.records
