"""Weekly reset benchmark: the sweep for 100, 1,000 and 5,000 organizations, against the floors
of its two parts measured in the same run.

    python bench/weekly_reset.py [--sizes 100,1000,5000] [--debt-every 5]

For each size, on a fresh database: seed the organizations through the store (accounts on the
`pro` plan, last week's meter, and for every `debt-every`-th organization a usage debt written
as a ledger debit), then start `WeeklyResetWorkflow` (the engine's defaults: pages of 200,
20 children at a time) on the engine's worker process and time it until its result. Then the
baselines, at the same size and concurrency:

- Temporal: `BenchSweepWorkflow` (bench/bare.py) running N no-op children, 20 at a time, on its
  own worker process;
- MongoDB: N single-document `update_one`s on the accounts, 20 at a time, from this process.

Every organization is checked reset once and every debt settled. The CPU time of each process
per organization says where the time goes. Results go to the `weekly_reset` section of
BENCHMARKS.md. Uses SecantusDB and the Temporal dev server started here unless `MONGODB_URI` /
`TEMPORAL_ADDRESS` are set.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bare import BareSweep, BenchSweepWorkflow
from common import (
    EngineProcess,
    Profiles,
    Stack,
    cpu_seconds,
    cpu_table,
    cpu_used,
    load_average,
    machine_rows,
    output_arg,
    per_op,
    run_all,
    stack,
    write_section,
)

from billing.clock import utcnow
from billing.config import load_config
from billing.ledger import EntryKind
from billing.models import WeeklyResetInput, WeeklyResetResult
from billing.runtime import Runtime
from billing.store.accounts import new_account
from billing.store.database import Database
from billing.weeks import iso_week, previous_week
from workflows.weekly_reset import WeeklyResetWorkflow

PLAN = "pro"
DEBT_UNITS = 700
LAST_WEEK_USED = 1234
SEED_CONCURRENCY = 16


@dataclass
class Timed:
    seconds: float
    cpu: dict[str, float]
    commands: dict[str, Any]


@dataclass
class Size:
    orgs: int
    debtors: int
    reset: Timed
    result: WeeklyResetResult
    children: Timed
    updates: Timed


async def seed(runtime: Runtime, size: int, debt_every: int, now: datetime) -> list[str]:
    """N organizations on `PLAN` with last week's meter; every `debt_every`-th owes usage."""
    db = runtime.db
    orgs = [f"org-{uuid.uuid4().hex[:6]}-{i:05d}" for i in range(size)]
    debtors = orgs[::debt_every]
    last_week = previous_week(iso_week(now))
    plan = runtime.config.plan(PLAN)

    async def owe(org: str) -> None:
        await runtime.ledger.write(org, key=f"usage:seed:{org}", kind=EntryKind.DEBIT,
                                   amount=-DEBT_UNITS, now=now, memo="seeded usage debt")

    # The debtors first: SecantusDB scans the accounts for each ledger write (see BENCHMARKS.md).
    await db.accounts.insert_many([new_account(org, PLAN, now) for org in debtors])
    await run_all(debtors, owe, SEED_CONCURRENCY)
    others = set(debtors)
    await db.accounts.insert_many([new_account(org, PLAN, now) for org in orgs
                                   if org not in others])
    await db.meters.insert_many([
        {"org_id": org, "week": last_week, "used": LAST_WEEK_USED, "quota": plan.meter_quota,
         "plan_id": PLAN, "ratio_version": runtime.config.meter.ratio_version,
         "created_at": now, "updated_at": now}
        for org in orgs])
    return orgs


async def reset(s: Stack, runtime: Runtime, week: str, profile: Path | None,
                label: str) -> tuple[Timed, WeeklyResetResult]:
    client = s.temporal()
    async with EngineProcess.worker(runtime.settings, s) as worker:
        async with Profiles(profile, s.pids, label):
            before = cpu_seconds(s.pids)
            started = time.perf_counter()
            result = await client.execute_workflow(
                WeeklyResetWorkflow.run, WeeklyResetInput(week=week),
                id=f"bench-weekly-reset-{uuid.uuid4().hex[:8]}",
                task_queue=runtime.settings.temporal_task_queue)
            elapsed = time.perf_counter() - started
            cpu = cpu_used(before, cpu_seconds(s.pids))
        commands = await worker.stop()
    return Timed(elapsed, cpu, commands), result


async def bare_children(s: Stack, db_name: str, size: int, concurrency: int) -> Timed:
    settings = s.settings(db_name)
    client = s.temporal()
    async with EngineProcess.worker(settings, s, kind="bare"):
        before = cpu_seconds(s.pids)
        started = time.perf_counter()
        done = await client.execute_workflow(
            BenchSweepWorkflow.run,
            BareSweep(prefix=f"bench-{uuid.uuid4().hex[:8]}", children=size,
                      concurrency=concurrency),
            id=f"bench-sweep-{uuid.uuid4().hex[:8]}", task_queue=settings.temporal_task_queue)
        elapsed = time.perf_counter() - started
        cpu = cpu_used(before, cpu_seconds(s.pids))
    assert done == size
    return Timed(elapsed, cpu, {})


async def bare_updates(s: Stack, db: Database, orgs: list[str], concurrency: int) -> Timed:
    async def touch(org: str) -> None:
        await db.accounts.update_one({"_id": org}, {"$set": {"touched_at": utcnow()}})

    before = cpu_seconds(s.pids)
    run = await run_all(orgs, touch, concurrency)
    return Timed(run.seconds, cpu_used(before, cpu_seconds(s.pids)), {})


async def check(db: Database, result: WeeklyResetResult, orgs: int, debtors: int,
                week: str) -> None:
    """Every organization reset once, every debt settled into this week's meter."""
    settled = await db.ledger.count_documents({"kind": EntryKind.SETTLEMENT.value})
    opened = await db.meters.count_documents({"week": week, "reset_at": {"$ne": None}})
    owing = await db.accounts.count_documents({"usage_debt": {"$gt": 0}})
    expected: tuple[int, int, int, list[str]] = (orgs, debtors * DEBT_UNITS, 0, [])
    found = (result.orgs, result.settled_units, result.skipped, result.failed)
    if found != expected or settled != debtors or opened != orgs or owing:
        raise RuntimeError(f"reset of {orgs} orgs: result {found} (expected {expected}), "
                           f"{settled} settlements, {opened} weeks opened, {owing} still owing")


async def one_size(s: Stack, size: int, args: argparse.Namespace) -> Size:
    name = f"billing_bench_{uuid.uuid4().hex[:8]}"
    settings = s.settings(name)
    db = Database(s.mongo_uri, name)
    runtime = Runtime(settings=settings, config=load_config(settings.billing_config), db=db)
    defaults = WeeklyResetInput()
    try:
        await db.ensure_indexes()
        now = utcnow()
        week = iso_week(now)
        orgs = await seed(runtime, size, args.debt_every, now)
        debtors = len(orgs[::args.debt_every])
        timed, result = await reset(s, runtime, week, args.profile, f"reset-{size}")
        print(f"{size} orgs: reset in {timed.seconds:.1f} s", flush=True)
        await check(db, result, size, debtors, week)
        children = await bare_children(s, name, size, defaults.concurrency)
        print(f"{size} orgs: {size} no-op children in {children.seconds:.1f} s", flush=True)
        updates = await bare_updates(s, db, orgs, defaults.concurrency)
        print(f"{size} orgs: {size} updates in {updates.seconds:.2f} s", flush=True)
        return Size(size, debtors, timed, result, children, updates)
    finally:
        await db.client.drop_database(name)
        await db.close()


def cpu_ms(timed: Timed, orgs: int) -> float:
    return sum(timed.cpu.values()) * 1000 / orgs


def report(sizes: list[Size], args: argparse.Namespace, load_before: str,
           load_after: str) -> str:
    defaults = WeeklyResetInput()
    rows = []
    for z in sizes:
        rows.append(
            f"| {z.orgs:,} | {z.debtors:,} | **{z.reset.seconds:.1f}** |"
            f" {z.reset.seconds / z.orgs * 1000:.1f} | {cpu_ms(z.reset, z.orgs):.1f} |"
            f" {z.children.seconds:.1f} | {cpu_ms(z.children, z.orgs):.1f} |"
            f" {z.children.seconds / z.reset.seconds:.2f} |"
            f" {cpu_ms(z.children, z.orgs) / cpu_ms(z.reset, z.orgs):.2f} |"
            f" {z.updates.seconds:.2f} | {z.updates.seconds / z.reset.seconds:.3f} |")
    first, last = sizes[0], sizes[-1]

    def growth(timed: Timed, orgs: int, base: Timed, base_orgs: int) -> float:
        return (timed.seconds / orgs) / (base.seconds / base_orgs)

    lines = [
        "## Weekly reset (`bench/weekly_reset.py`)",
        "",
        f"Organizations on the `{PLAN}` plan, each with last week's meter; every"
        f" {args.debt_every}th owes {DEBT_UNITS}",
        "units of usage debt (a ledger debit beyond its balance). Seeded through the store, then",
        "`WeeklyResetWorkflow` runs with the engine's defaults (pages of"
        f" {defaults.page_size}, {defaults.concurrency} children at a time,",
        f"continue-as-new after {defaults.pages_per_run} pages) on the engine's worker process,"
        " timed from its start",
        "to its result: one child workflow `weekly-reset-<org>-<week>` and one transaction per",
        "organization (open the week, archive the old ones, settle the debt). Checked afterwards:",
        "every organization reset once and every debt settled. Baselines of the same run and",
        f"size: as many no-op child workflows, {defaults.concurrency} at a time"
        " (`BenchSweepWorkflow` in `bench/bare.py`,",
        "its own worker process), and as many single-document `update_one`s,"
        f" {defaults.concurrency} at a time.",
        f"Load average: {load_before} at the start, {load_after} at the end.",
        "",
        *machine_rows(temporal=True),
        "",
        "| organizations | with debt | reset s | ms per org | CPU ms per org |"
        " no-op children s | CPU ms per child | ratio | CPU ratio | `update_one`s s |"
        " ratio to updates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "'ratio' is the no-op children's time divided by the reset's (the share of the Temporal",
        "floor the reset reaches), 'CPU ratio' the same with the CPU time of all processes, which",
        "other work on the machine does not move.",
        "",
        f"- **Growth.** The time per organization at {last.orgs:,} is"
        f" {growth(last.reset, last.orgs, first.reset, first.orgs):.2f}x the time at"
        f" {first.orgs:,}",
        f"  (no-op children: {growth(last.children, last.orgs, first.children, first.orgs):.2f}x;"
        " 1.00x is linear growth).",
        "",
        "### Where the time goes",
        "",
        "CPU milliseconds per organization, by process (from /proc):",
        "",
        *cpu_table([(f"reset {z.orgs:,}", z.reset.cpu, z.orgs) for z in sizes]
                   + [(f"no-op children {last.orgs:,}", last.children.cpu, last.orgs)]),
        "",
        "MongoDB commands per organization sent by the worker's activities (pages and resets):",
        "",
        "| organizations | commands | per organization | write conflicts |",
        "|---|---|---|---|",
        *[f"| {z.orgs:,} | {sum(z.reset.commands.get('sent', {}).values()) / z.orgs:.1f} |"
          f" {per_op(z.reset.commands.get('sent', {}), z.orgs)} |"
          f" {z.reset.commands.get('failures', {}).get('WriteConflict', 0) / z.orgs:.2f} |"
          for z in sizes],
        "",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    load_before = load_average()
    async with stack(temporal=True) as s:
        sizes = [await one_size(s, size, args) for size in args.sizes]
    write_section("weekly_reset", report(sizes, args, load_before, load_average()), args.output)
    print(f"wrote {args.output}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=lambda v: [int(n) for n in v.split(",")],
                        default=[100, 1000, 5000], help="comma-separated organization counts")
    parser.add_argument("--debt-every", type=int, default=5)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="sample the processes with py-spy during the resets (skews timing)")
    output_arg(parser)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
