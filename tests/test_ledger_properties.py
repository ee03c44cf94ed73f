"""Property test of the ledger on the real database: random sequences of every operation of
SPEC §5.1, in random order, keep the ledger's invariants."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_ledger_store import assert_consistent

from billing.ledger import EntryKind
from billing.money import round_half_up_div
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.ledger import Ledger, LedgerResult, LotTerms

Op = tuple[object, ...]

expiry = st.none() | st.integers(1, 60)
topup = st.tuples(st.just("topup"), st.integers(1, 1_000_000), st.integers(1, 10_000), expiry)
clawback = st.tuples(
    st.sampled_from(["refund", "dispute"]), st.integers(0, 1_000), st.integers(1, 6_000)
)
reinstate = st.tuples(st.just("reinstate"), st.integers(0, 1_000))
#: Purchases, clawbacks and reinstatements weigh double: they need each other to happen at all.
ops = st.one_of(
    topup,
    topup,
    clawback,
    clawback,
    reinstate,
    reinstate,
    st.tuples(st.just("grant"), st.integers(1, 5_000), expiry),
    st.tuples(st.just("debit"), st.integers(1, 400_000)),
    st.tuples(st.just("advance"), st.integers(1, 40)),
    st.tuples(st.just("adjust"), st.integers(-50_000, -1) | st.integers(1, 50_000)),
    st.tuples(st.just("replay"), st.integers(0, 1_000)),
)


@dataclass
class Run:
    """One organization's random history and what the test remembers of it."""

    ledger: Ledger
    org: str
    now: datetime
    balance: int = 0
    purchases: list[str] = field(default_factory=list)
    disputes: list[str] = field(default_factory=list)
    done: list[Callable[[], Awaitable[LedgerResult]]] = field(default_factory=list)

    async def apply(self, write: Callable[[], Awaitable[LedgerResult]]) -> LedgerResult:
        """Run one ledger call, check its reported balance, and keep it for later replays."""
        result = await write()
        if result.applied:
            self.balance += result.amount
        assert result.balance == self.balance
        self.done.append(write)
        return result

    async def write(
        self, key: str, kind: EntryKind, amount: int, terms: LotTerms | None = None
    ) -> LedgerResult:
        ledger, org, now = self.ledger, self.org, self.now
        result = await self.apply(
            lambda: ledger.write(org, key=key, kind=kind, amount=amount, now=now, terms=terms)
        )
        assert result.applied
        return result

    def expiry(self, days: int | None) -> datetime | None:
        return None if days is None else self.now + timedelta(days=days)

    async def step(self, i: int, op: Op) -> None:
        ledger, org, now = self.ledger, self.org, self.now
        match op:
            case ("topup", int(units), int(cents), (None | int()) as days):
                terms = LotTerms(
                    payment_intent=f"pi_{i}-{org}",
                    charge=f"ch_{i}-{org}",
                    price_cents=cents,
                    pack_id="pack",
                    expires_at=self.expiry(days),
                )
                result = await self.write(f"payment:pi_{i}", EntryKind.TOPUP, units, terms)
                assert result.entry is not None
                self.purchases.append(str(result.entry["lot_id"]))
            case ("grant", int(units), (None | int()) as days):
                terms = LotTerms(expires_at=self.expiry(days))
                await self.write(f"grant:g{i}", EntryKind.GRANT, units, terms)
            case ("debit", int(units)):
                await self.write(f"usage:run{i}:initial", EntryKind.DEBIT, -units)
            case ("adjust", int(units)):
                await self.write(f"admin:req{i}", EntryKind.ADJUSTMENT, units)
            case ("refund" | "dispute", int(pick), int(cents)) if self.purchases:
                lot_id = self.purchases[pick % len(self.purchases)]
                kind = EntryKind.DISPUTE if op[0] == "dispute" else EntryKind.REFUND
                key = f"dispute:dp_{i}:withdrawn" if kind is EntryKind.DISPUTE else f"refund:re_{i}"
                await self.apply(
                    lambda: ledger.clawback(
                        org, key=key, kind=kind, lot_id=lot_id, cents=cents, now=now
                    )
                )
                if kind is EntryKind.DISPUTE:
                    self.disputes.append(f"dispute:dp_{i}")
            case ("reinstate", int(pick)) if self.disputes:
                dp = self.disputes[pick % len(self.disputes)]
                await self.apply(
                    lambda: ledger.reinstate(
                        org, key=f"{dp}:reinstated", withdrawn_key=f"{dp}:withdrawn", now=now
                    )
                )
            case ("advance", int(days)):
                self.now = now = now + timedelta(days=days)
                for lot in await ledger.lots(org, open_only=False):
                    lot_id = str(lot["_id"])
                    await self.apply(partial(ledger.expire, org, lot_id, now))
            case ("replay", int(pick)) if self.done:
                write = self.done[pick % len(self.done)]
                assert not (await self.apply(write)).applied


async def check_invariants(db: Database, org: str) -> None:
    """The organization-wide invariants, then what refunds and disputes did to each purchase."""
    account = await assert_consistent(db, org)
    entries = [e async for e in db.ledger.find({"org_id": org})]
    lots = {lot["_id"]: lot async for lot in db.lots.find({"org_id": org})}
    for lot_id, lot in lots.items():
        if lot["kind"] == EntryKind.REINSTATEMENT.value:  # restored with the original expiry
            assert lot["expires_at"] == lots[lot["source_lot"]]["expires_at"]
        if lot["kind"] != EntryKind.TOPUP.value:
            continue
        assert 0 <= lot["clawed_units"] <= lot["units"]
        clawed = -sum(
            e["amount"]
            for e in entries
            if e["kind"] in (EntryKind.REFUND, EntryKind.DISPUTE) and e["lot_id"] == lot_id
        )
        reinstated = sum(x["units"] for x in lots.values() if x.get("source_lot") == lot_id)
        assert clawed - reinstated == lot["clawed_units"]
        if not reinstated:  # cumulative rounding of every cent refunded or disputed so far
            assert lot["clawed_units"] == min(
                lot["units"],
                round_half_up_div(lot["clawback_cents"] * lot["units"], lot["price_cents"]),
            )
    for kind in sorted({e["kind"] for e in entries}):
        event(f"wrote {kind}")
    if account["usage_debt"] or account["other_debt"]:
        event("ended in debt")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=st.lists(ops, min_size=10, max_size=40))
async def test_random_histories_keep_the_ledger_invariants(
    history: list[Op], accounts: Accounts, ledger: Ledger, db: Database, now: datetime
) -> None:
    org = f"prop-{uuid.uuid4().hex[:12]}"
    await accounts.ensure_in(None, org, now)
    run = Run(ledger=ledger, org=org, now=now)
    for i, op in enumerate(history):
        await run.step(i, op)
    await check_invariants(db, org)
