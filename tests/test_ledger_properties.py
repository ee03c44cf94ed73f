"""Property test of the ledger on the real database: random sequences of every operation of
SPEC §5.1, in random order, keep the ledger's invariants."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from billing.ledger import EntryKind, check_sign
from billing.money import round_half_up_div
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.ledger import Ledger, LedgerResult, LotTerms

Op = tuple[object, ...]

expiry = st.none() | st.integers(1, 60)
ops = st.one_of(
    st.tuples(st.just("topup"), st.integers(1, 1_000_000), st.integers(1, 10_000), expiry),
    st.tuples(st.just("grant"), st.integers(1, 5_000), expiry),
    st.tuples(st.just("debit"), st.integers(1, 400_000)),
    st.tuples(st.sampled_from(["refund", "dispute"]), st.integers(0, 1_000), st.integers(1, 6_000)),
    st.tuples(st.just("reinstate"), st.integers(0, 1_000)),
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
        result = await write()
        if result.applied:
            self.balance += result.amount
        assert result.balance == self.balance
        self.done.append(write)
        return result

    async def step(self, i: int, op: Op) -> None:
        ledger, org, now = self.ledger, self.org, self.now
        match op:
            case ("topup", int(units), int(cents), days):
                terms = LotTerms(
                    payment_intent=f"pi_{i}", charge=f"ch_{i}", price_cents=cents,
                    pack_id="pack", expires_at=None if days is None else now + timedelta(days=days),
                )
                result = await self.apply(lambda: ledger.write(
                    org, key=f"payment:pi_{i}", kind=EntryKind.TOPUP, amount=units, now=now,
                    terms=terms,
                ))
                assert result.applied
                self.purchases.append(str(result.entry["lot_id"]))
            case ("grant", int(units), days):
                terms = LotTerms(expires_at=None if days is None else now + timedelta(days=days))
                assert (await self.apply(lambda: ledger.write(
                    org, key=f"grant:g{i}", kind=EntryKind.GRANT, amount=units, now=now,
                    terms=terms,
                ))).applied
            case ("debit", int(units)):
                assert (await self.apply(lambda: ledger.write(
                    org, key=f"usage:run{i}:initial", kind=EntryKind.DEBIT, amount=-units, now=now,
                ))).applied
            case ("adjust", int(units)):
                assert (await self.apply(lambda: ledger.write(
                    org, key=f"admin:req{i}", kind=EntryKind.ADJUSTMENT, amount=units, now=now,
                ))).applied
            case ("refund" | "dispute", int(pick), int(cents)) if self.purchases:
                lot_id = self.purchases[pick % len(self.purchases)]
                dispute = op[0] == "dispute"
                key = f"dispute:dp_{i}:withdrawn" if dispute else f"refund:re_{i}"
                await self.apply(lambda: ledger.clawback(
                    org, key=key, kind=EntryKind.DISPUTE if dispute else EntryKind.REFUND,
                    lot_id=lot_id, cents=cents, now=now,
                ))
                if dispute:
                    self.disputes.append(f"dispute:dp_{i}")
            case ("reinstate", int(pick)) if self.disputes:
                dp = self.disputes[pick % len(self.disputes)]
                await self.apply(lambda: ledger.reinstate(
                    org, key=f"{dp}:reinstated", withdrawn_key=f"{dp}:withdrawn", now=now,
                ))
            case ("advance", int(days)):
                self.now = now = now + timedelta(days=days)
                for lot in await ledger.lots(org, open_only=False):
                    lot_id = str(lot["_id"])
                    await self.apply(lambda lot_id=lot_id: ledger.expire(org, lot_id, now))
            case ("replay", int(pick)) if self.done:
                write = self.done[pick % len(self.done)]
                assert not (await self.apply(write)).applied


async def check_invariants(db: Database, org: str) -> None:
    account = await db.accounts.find_one({"_id": org})
    assert account is not None
    entries = [e async for e in db.ledger.find({"org_id": org}).sort("seq", 1)]
    lots = {lot["_id"]: lot async for lot in db.lots.find({"org_id": org})}

    assert account["balance"] == sum(e["amount"] for e in entries)
    assert account["usage_debt"] >= 0 and account["other_debt"] >= 0
    assert account["balance"] == (
        sum(lot["remaining"] for lot in lots.values())
        - account["usage_debt"]
        - account["other_debt"]
    )
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys))
    running = 0
    for e in entries:
        check_sign(EntryKind(e["kind"]), e["amount"])  # never zero, signed per kind
        running += e["amount"]
        assert e["balance_after"] == running
    for lot in lots.values():
        assert 0 <= lot["remaining"] <= lot["units"]

    for lot_id, lot in lots.items():
        if lot["kind"] != EntryKind.TOPUP.value:
            continue
        assert 0 <= lot["clawed_units"] <= lot["units"]
        clawed = -sum(
            e["amount"] for e in entries
            if e["kind"] in (EntryKind.REFUND, EntryKind.DISPUTE) and e["lot_id"] == lot_id
        )
        reinstated = sum(x["units"] for x in lots.values() if x.get("source_lot") == lot_id)
        assert clawed - reinstated == lot["clawed_units"]
        assert clawed - reinstated <= lot["units"]
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
