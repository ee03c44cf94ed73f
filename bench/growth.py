"""Growth benchmark: does the cost of the hot paths stay flat as a deployment's data grows?

    python bench/growth.py [--seconds 6] [--concurrency 16] [--orgs 5000] [--weeks 10]

Starts its own SecantusDB server (unless `MONGODB_URI` is set) and measures, in one run on one
server, each hot path first on a small database (100 organizations), then again after adding
`--orgs` organizations with `--weeks` closed weeks of meters and of balance holds, a pack, a
debit and their lots each
(about a year of a mid-sized deployment). The ratio `grown / small` should stay near 1: every
command of these paths is an index lookup (`tests/test_query_shapes.py` guards the shapes).

- usage within quota and overflowing: `Meters.record`, the function behind `POST /v1/usage`;
- registration: `Accounts.register`, behind `PUT /v1/orgs/{org}`;
- a purchase: the ledger transaction a `payment_intent.succeeded` writes (the payment intent's
  lots looked up, the lot, the entry and the account (opened if new) written);
- a run with a balance hold: `Meters.hold`, then the usage record that settles it.

The results go to the `growth` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from common import TOKEN, load_average, load_parser, machine_rows, stack, write_section
from pymongo.asynchronous.client_session import AsyncClientSession

from billing.clock import utcnow
from billing.config import EXAMPLE_CONFIG, Settings, load_config
from billing.holds import Hold, HoldRequest
from billing.ledger import EntryKind
from billing.metering import UsageRequest
from billing.runtime import Runtime
from billing.store.database import Database
from billing.store.documents import LotTerms
from billing.store.meters import Meters
from billing.store.transactions import run_in_transaction
from billing.weeks import iso_week

Op = Callable[[int], Awaitable[None]]
SMALL = 100


async def rate(name: str, op: Op, *, concurrency: int, seconds: float) -> float:
    """Operations per second of `op` from `concurrency` tasks, after a short warm-up."""
    sequence = itertools.count()

    async def run(until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            await op(next(sequence))
            done += 1
        return done

    await asyncio.gather(*(run(time.perf_counter() + 0.5) for _ in range(concurrency)))
    started = time.perf_counter()
    done = sum(await asyncio.gather(
        *(run(started + seconds) for _ in range(concurrency))))
    per_second = done / (time.perf_counter() - started)
    print(f"{name:<45} {per_second:8.0f}/s", flush=True)
    return per_second


async def add_history(db: Database, count: int, weeks: int, tag: str) -> None:
    """`count` organizations with `weeks` closed weeks of meters and a bought, partly used pack,
    written in bulk in the shape the engine writes them."""
    now = utcnow()
    for start in range(0, count, 500):
        orgs = [f"grown-{tag}-{i}" for i in range(start, min(start + 500, count))]
        await db.accounts.insert_many([
            {"_id": org, "plan_id": "pro", "balance": 400000, "usage_debt": 0, "other_debt": 0,
             "seq": 2, "lots": [{"id": f"lot_{org}", "remaining": 400000,
                                 "expires_at": now + timedelta(days=365), "seq": 1}],
             "created_at": now, "updated_at": now} for org in orgs])
        await db.meters.insert_many([
            {"org_id": org, "week": iso_week(now - timedelta(weeks=w + 1)), "used": 1000 * w,
             "quota": 500000, "plan_id": "pro", "ratio_version": "2026.05",
             "created_at": now, "updated_at": now, "archived_at": now}
            for org in orgs for w in range(weeks)])
        await db.lots.insert_many([
            {"_id": f"lot_{org}", "org_id": org, "kind": "topup", "key": f"payment:pi_{org}",
             "seq": 1, "units": 500000, "repaid_debt": 0, "repaid_usage": 0, "line": 1,
             "expires_at": now + timedelta(days=365), "sweep_at": now + timedelta(days=365),
             "payment_intent": f"pi_{org}",
             "charge": f"ch_{org}", "checkout_session": None, "pack_id": "pack_500k",
             "price_cents": 4900, "source_lot": None, "clawbacks": [], "clawback_cents": 0,
             "clawed_units": 0, "usage_returned": 0, "created_at": now} for org in orgs])
        await db.holds.insert_many([
            {"_id": f"{org}/h-{w}", "org_id": org, "hold_id": f"h-{w}", "units": 1000,
             "expires_at": now - timedelta(weeks=w + 1), "remaining": 400000,
             "created_at": now - timedelta(weeks=w + 1)} for org in orgs for w in range(weeks)])
        await db.ledger.insert_many([
            entry for org in orgs for entry in (
                {"org_id": org, "seq": 1, "key": f"payment:pi_{org}", "kind": "topup",
                 "amount": 500000, "lot_id": f"lot_{org}", "memo": "", "created_at": now},
                {"org_id": org, "seq": 2, "key": f"usage:r-{org}:initial", "kind": "debit",
                 "amount": -100000, "lot_id": None, "memo": "", "created_at": now,
                 "draws": [{"lot_id": f"lot_{org}", "units": 100000}]})])


async def measure_all(runtime: Runtime, meters: Meters, args: argparse.Namespace,
                      phase: str) -> dict[str, float]:
    db = runtime.db
    now = utcnow()
    pro = [f"{phase}-pro-{i}" for i in range(50)]
    free = [f"{phase}-free-{i}" for i in range(50)]
    for org in pro + free:
        await runtime.accounts.register(org, now)
    for org in pro:
        async def on_pro(session: AsyncClientSession, org: str = org) -> bool:
            return await meters.apply_plan_change_in(session, org, "pro", now)

        await run_in_transaction(db.client, on_pro)
    c, secs = args.concurrency, args.seconds

    def usage(orgs: list[str], units: int | None) -> Op:
        async def op(i: int) -> None:
            request = UsageRequest(org_id=orgs[i % len(orgs)], run_id=f"{phase}-{i}",
                                   costs=None if units is not None else {"llm": 0.0005},
                                   units=units)
            assert (await meters.record(request, utcnow())).applied
        return op

    async def hold_run(i: int) -> None:
        org, run = pro[i % len(pro)], f"{phase}-h-{i}"
        granted = await meters.hold(org, HoldRequest(hold_id=run, units=1), utcnow())
        assert isinstance(granted, Hold)
        settled = await meters.record(
            UsageRequest(org_id=org, run_id=run, units=1, hold_id=run), utcnow())
        assert settled.applied

    async def register(i: int) -> None:
        assert (await runtime.accounts.register(f"{phase}-new-{i}", utcnow())).created

    async def purchase(i: int) -> None:
        org, pi = pro[i % len(pro)], f"pi_{phase}_{i}"

        async def work(session: AsyncClientSession) -> None:
            assert not await runtime.ledger.paid_for_in(session, pi)
            result = await runtime.ledger.write_in(
                session, org, key=f"payment:{pi}", kind=EntryKind.TOPUP, amount=500000,
                now=utcnow(), terms=LotTerms(payment_intent=pi, price_cents=4900, line=1,
                                             pack_id="pack_500k"),
                opening=runtime.accounts.opening(org, utcnow()), unused_key=True)
            assert result.applied

        await run_in_transaction(db.client, work)

    return {
        "within": await rate(f"{phase}: usage within quota", usage(pro, None),
                             concurrency=c, seconds=secs),
        "overflow": await rate(f"{phase}: usage overflowing", usage(free, 1),
                               concurrency=c, seconds=secs),
        "register": await rate(f"{phase}: registration", register, concurrency=c,
                               seconds=secs),
        "purchase": await rate(f"{phase}: purchase transaction", purchase, concurrency=c,
                               seconds=secs),
        "hold": await rate(f"{phase}: run with a hold", hold_run, concurrency=c, seconds=secs),
    }


async def counts(db: Database) -> dict[str, int]:
    return {name: await db[name].count_documents({})
            for name in ("accounts", "meters", "lots", "ledger", "usage", "holds")}


def report(small: dict[str, float], grown: dict[str, float], sizes: tuple[dict[str, int],
           dict[str, int]], args: argparse.Namespace, load_before: str) -> str:
    labels = {"within": "usage within quota (`Meters.record`)",
              "overflow": "usage overflowing (ledger debit in the same transaction)",
              "register": "registration (`PUT /v1/orgs/{org}`)",
              "purchase": "purchase transaction (paid-for lookup, lot, entry, account)",
              "hold": "run with a balance hold (`Meters.hold`, then the record settling it)"}
    before, after = sizes
    lines = [
        "## Growth (`bench/growth.py`; cost must not grow with data)",
        "",
        f"Each path runs {args.seconds:g} s with {args.concurrency} concurrent callers on a small",
        f"database ({SMALL} organizations), then again after {args.orgs:,} more organizations with",
        f"{args.weeks} closed weeks of meters and of balance holds, a pack and a debit each.",
        f"Load average at the start: {load_before}.",
        "",
        *machine_rows(temporal=False),
        "",
        "| documents | small | grown |",
        "|---|---|---|",
        *[f"| {name} | {before[name]:,} | {after[name]:,} |" for name in before],
        "",
        "| path | small, per second | grown, per second | grown / small |",
        "|---|---|---|---|",
        *[f"| {labels[k]} | {small[k]:,.0f} | {grown[k]:,.0f} | {grown[k] / small[k]:.2f} |"
          for k in labels],
        "",
        "Every command of these paths is an update, insert or read by an index; none is a",
        "`findAndModify`, which the embedded server runs as a scan of the whole collection (the",
        "meter increment and the account lock used to be, and slowed nine-fold within a year of",
        "meters). `tests/test_query_shapes.py` fails when a query shape without an index, or a",
        "`findAndModify`, appears on these paths. On this shared 2-core machine the ratios move",
        "by about 0.2 between runs (a 6 s run measured 0.61 for the overflowing path); timed one",
        "by one, each command of that path costs 1.1-1.2x as much grown as small (a deeper",
        "B-tree), where a scan would cost 50x.",
        "",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    load_before = load_average()
    async with stack(temporal=False) as s:
        name = f"billing_growth_{uuid.uuid4().hex[:8]}"
        db = Database(s.mongo_uri, name, maxPoolSize=64)
        runtime = Runtime(settings=Settings(mongodb_uri=s.mongo_uri, mongodb_db=name,
                                            billing_api_token=TOKEN),
                          config=load_config(EXAMPLE_CONFIG), db=db)
        meters = Meters(db, runtime.config)
        try:
            await db.ensure_indexes()
            await add_history(db, SMALL, args.weeks, "small")
            before = await counts(db)
            small = await measure_all(runtime, meters, args, "small")
            started = time.perf_counter()
            await add_history(db, args.orgs, args.weeks, "grown")
            print(f"grew the database in {time.perf_counter() - started:.0f} s", flush=True)
            after = await counts(db)
            grown = await measure_all(runtime, meters, args, "grown")
            write_section("growth", report(small, grown, (before, after), args, load_before),
                          args.output)
            print(f"wrote {args.output}")
        finally:
            await db.client.drop_database(name)
            await db.close()


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__, seconds=6.0, per="path")
    parser.add_argument("--orgs", type=int, default=5000)
    parser.add_argument("--weeks", type=int, default=10)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
