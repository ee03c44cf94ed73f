"""Usage-recording benchmark: records per second and latency, against a raw `$inc` baseline.

    python bench/usage.py [--seconds 8] [--concurrency 16] [--output BENCHMARKS.md]

Starts its own SecantusDB server (unless `MONGODB_URI` is set) and measures, in one run on one
server:

- the baseline: a raw single-document `find_one_and_update` `$inc`, no transaction;
- `Meters.record` (the Python function behind `POST /v1/usage`) for 1 and for 50 organizations;
- `POST /v1/usage` through HTTP: the ASGI app served by uvicorn in this process, driven by httpx;
- `POST /v1/usage/batch` with batches of 100 records over 50 organizations (records per second);
- the same at concurrency 1 and with every record overflowing, to show where the time goes.

A command listener on the client counts the MongoDB commands per record (and the write conflicts
that make a transaction start again). The results go to the `usage` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from common import (
    TOKEN,
    CommandCounter,
    load_average,
    load_parser,
    machine_rows,
    per_op,
    percentile,
    stack,
    write_section,
)
from http_load import LoadClient
from pymongo import ReturnDocument

from billing.clock import utcnow
from billing.config import EXAMPLE_CONFIG, Settings, load_config
from billing.metering import UsageRequest
from billing.runtime import Runtime
from billing.store.database import Database
from billing.store.meters import Meters
from billing.store.transactions import run_in_transaction
from starter import event_loop
from starter.api.app import create_app
from starter.embedded import free_port, wait_for_port

COSTS = {"llm": 0.0005}  # 1 unit on the pro plan (ratio 2)
BATCH = 100


@dataclass
class Result:
    name: str
    concurrency: int
    ops: int
    seconds: float
    latencies: list[float] = field(repr=False)
    commands: dict[str, int]
    failures: dict[str, int]
    micros: dict[str, int]
    per_op: int = 1  # records per operation (a batch)

    @property
    def records(self) -> int:
        return self.ops * self.per_op

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p) * 1000


Op = Callable[[int], Awaitable[None]]


async def load(name: str, op: Op, *, concurrency: int, seconds: float,
               counter: CommandCounter, per_op: int = 1) -> Result:
    """Run `op` from `concurrency` tasks for `seconds` after a short unmeasured warm-up."""
    sequence = itertools.count()

    async def run(until: float, latencies: list[float]) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            await op(next(sequence))
            latencies.append(time.perf_counter() - started)

    warm = time.perf_counter() + min(1.0, seconds / 4)
    await asyncio.gather(*(run(warm, []) for _ in range(concurrency)))
    counter.reset()
    latencies: list[float] = []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(run(until, latencies) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    result = Result(name, concurrency, len(latencies), elapsed, latencies, dict(counter.sent),
                    dict(counter.failures), dict(counter.micros), per_op)
    print(f"{name:<50} c={concurrency:<3} {result.rate:8.0f}/s"
          f"  p50 {result.percentile(0.5):7.2f} ms  p99 {result.percentile(0.99):7.2f} ms",
          flush=True)
    return result


async def prepare_orgs(meters: Meters, runtime: Runtime, prefix: str, count: int,
                       plan_id: str) -> list[str]:
    orgs = [f"{prefix}-{i}" for i in range(count)]
    now = utcnow()
    for org in orgs:
        await runtime.accounts.register(org, now)

        async def change(session: Any, org: str = org) -> bool:
            return await meters.apply_plan_change_in(session, org, plan_id, now)

        await run_in_transaction(runtime.db.client, change)
    return orgs


def record_op(meters: Meters, orgs: list[str], tag: str, units: int | None = None) -> Op:
    async def op(i: int) -> None:
        request = UsageRequest(org_id=orgs[i % len(orgs)], run_id=f"{tag}-{i}",
                               costs=None if units is not None else COSTS, units=units)
        result = await meters.record(request, utcnow())
        assert result.applied
    return op


def http_op(client: LoadClient, orgs: list[str], tag: str) -> Op:
    async def op(i: int) -> None:
        response = await client.post("/v1/usage", json={
            "org_id": orgs[i % len(orgs)], "run_id": f"{tag}-{i}", "costs": COSTS})
        if response.status_code != 200 or not response.json()["applied"]:
            raise RuntimeError(f"usage failed: {response.status_code} {response.text}")
    return op


def batch_op(client: LoadClient, orgs: list[str], tag: str, size: int) -> Op:
    async def op(i: int) -> None:
        records = [{"org_id": orgs[(i * size + k) % len(orgs)], "run_id": f"{tag}-{i}-{k}",
                    "costs": COSTS} for k in range(size)]
        response = await client.post("/v1/usage/batch", json={"records": records})
        if response.status_code != 200 or not all(
                r.get("applied") for r in response.json()["results"]):
            raise RuntimeError(f"batch failed: {response.status_code} {response.text[:300]}")
    return op


def report(results: dict[str, Result], baseline: Result, args: argparse.Namespace,
           load_before: str, load_after: str) -> str:
    def ratio(key: str) -> float:
        return results[key].rate / baseline.rate

    def server_ms(key: str, command: str | None = None) -> float:
        """Time waited for the server per record, for one kind of command or all of them."""
        micros = results[key].micros
        waited = micros.get(command, 0) if command else sum(micros.values())
        return waited / 1000 / results[key].records

    def row(key: str, label: str) -> str:
        r = results[key]
        return (f"| {label} | {r.concurrency} | {r.records} | {r.rate:,.0f} |"
                f" {r.percentile(0.5):.2f} |"
                f" {r.percentile(0.99):.2f} | {ratio(key):.2f} |")

    def conflicts(key: str) -> float:
        r = results[key]
        return r.failures.get("WriteConflict", 0) / r.records

    def commands(key: str, label: str) -> str:
        r = results[key]
        server_ms = sum(r.micros.values()) / 1000 / r.records
        return (f"| {label} | {sum(r.commands.values()) / r.records:.2f} |"
                f" {per_op(r.commands, r.records)} | {conflicts(key):.2f} | {server_ms:.2f} |")

    def p50(key: str) -> float:
        return results[key].percentile(0.5)

    def alone(key: str, label: str) -> str:
        r = results[key]
        mean_ms = sum(r.latencies) / r.ops * 1000
        server_ms = sum(r.micros.values()) / 1000 / r.ops
        return (f"| {label} | {p50(key):.2f} | {mean_ms:.2f} | {server_ms:.2f} |"
                f" {max(0.0, mean_ms - server_ms):.2f} |")

    within = sum(results["api_50"].commands.values()) / results["api_50"].records
    overflowing = (sum(results["api_50_overflow"].commands.values())
                   / results["api_50_overflow"].records)
    batch = sum(results["batch_50"].commands.values()) / results["batch_50"].records
    lines = [
        "## Usage records (`bench/usage.py`; SPEC §5.2, group commit)",
        "",
        f"Each load runs {args.seconds:g} s after a short warm-up, with {args.concurrency}"
        " concurrent callers unless",
        "the row says otherwise, against one SecantusDB server. The benchmark, the HTTP app and",
        "the database server share the machine's cores: compare the rows with each other, not",
        "with a dedicated MongoDB replica set. Load average: "
        f"{load_before} at the start, {load_after} at the end.",
        "",
        *machine_rows(temporal=False),
        "",
        "Organizations on the `pro` plan, records within quota (the common case) unless the row",
        "says otherwise. `ratio` is the throughput divided by the baseline's.",
        "",
        "| path | concurrency | records | per second | p50 ms | p99 ms | ratio |",
        "|---|---|---|---|---|---|---|",
        f"| baseline: raw `find_one_and_update` `$inc`, one document | {baseline.concurrency} |"
        f" {baseline.ops} | {baseline.rate:,.0f} | {baseline.percentile(0.5):.2f} |"
        f" {baseline.percentile(0.99):.2f} | 1.00 |",
        row("api_1", "Python API, 1 organization"),
        row("api_50", "Python API, 50 organizations"),
        row("http_1", "HTTP `POST /v1/usage`, 1 organization"),
        row("http_50", "HTTP `POST /v1/usage`, 50 organizations"),
        row("batch_50", f"HTTP `POST /v1/usage/batch`, {BATCH} records per call over 50"
            " organizations"),
        row("api_1_processes", "Python API, 1 organization, one `Meters` per caller"),
        row("api_50_overflow", "Python API, 50 organizations, every record overflowing"),
        "",
        "### Where the time goes",
        "",
        "MongoDB commands per record (counted by a PyMongo command listener), write conflicts per",
        "record (each restarts that record's transaction) and the time the client waited for the",
        "server per record, summed over its commands (under load this includes queueing):",
        "",
        "| path | commands | commands per record | write conflicts | server ms |",
        "|---|---|---|---|---|",
        commands("api_1", "Python API, 1 organization"),
        commands("api_50", "Python API, 50 organizations"),
        commands("api_1_processes", "1 organization, one `Meters` per caller"),
        commands("api_50_overflow", "50 organizations, overflowing"),
        commands("batch_50", f"batches of {BATCH} over 50 organizations"),
        "",
        "One caller alone (concurrency 1): latency, the part spent waiting for the server's",
        "answers and the rest (client-side Python: validation, the driver, the ASGI app):",
        "",
        "| step | p50 ms | mean ms | server ms | client ms |",
        "|---|---|---|---|---|",
        alone("seq_raw", "raw `$inc` (one command)"),
        alone("seq_txn", "transaction holding one `$inc`, then its commit"),
        alone("seq_record", "`Meters.record`, within quota"),
        alone("seq_overflow", "`Meters.record`, overflow debited from the ledger"),
        alone("seq_http", "HTTP `POST /v1/usage`, within quota (server: MongoDB only)"),
        "",
        "Reading the numbers:",
        "",
        "- **Group commit.** The records that arrive while a transaction commits wait for the",
        "  next one, which carries all of them (up to 1,000). A group is one unit of work of the",
        "  write engine (`billing/store/books.py`): the accounts and meters are read once, every",
        "  record is decided in memory in arrival order, and the meter increments and usage",
        f"  records are written with one bulk update and one bulk insert: {within:.2f} commands",
        "  per record where the baseline sends one, so the engine can outrun a raw `$inc` per",
        f"  record (50 organizations: ratio {ratio('api_50'):.2f}). A record that opens a week's",
        "  meter, crosses an alert threshold or triggers an automatic top-up stays in the group:",
        "  its meter is inserted, its notifications and trigger written with the others.",
        f"- **Batches.** `POST /v1/usage/batch` sends {batch:.3f} commands per record and pays",
        "  the HTTP request, validation and JSON once per batch: "
        f"{results['batch_50'].rate:,.0f} records/s, ratio {ratio('batch_50'):.2f}. Each group",
        "  carries a whole call or more, so each organization's meter is written once per",
        "  group. A usage record's `_id` is its idempotency key and it has no other index (the",
        "  week's overflow is counted on the meter), because on this server each index entry",
        "  costs an insert about as much as the document. Server time per record: "
        f"{server_ms('batch_50'):.3f} ms,",
        f"  of which {server_ms('batch_50', 'insert'):.3f} ms inserting the usage records.",
        "- **Contention.** With 1 organization every record increments one meter document.",
        "  Within a process the group commit applies them in shared transactions, so they never",
        f"  conflict ({conflicts('api_1'):.2f} conflicts per record,",
        f"  {results['api_1'].rate:,.0f} records/s). The row 'one `Meters` per caller' plays",
        f"  {args.concurrency} processes writing to one organization: their transactions conflict",
        f"  ({conflicts('api_1_processes'):.2f} per record) and restart after a jittered backoff",
        f"  ({results['api_1_processes'].rate:,.0f} records/s, p99"
        f" {results['api_1_processes'].percentile(0.99):,.0f} ms).",
        f"- **Overflow.** A record beyond the quota sends {overflowing:.2f} commands: an",
        "  organization's open lots are kept on its account, which the group reads anyway, so",
        "  every debit is planned in memory with the ledger's rules on what was read, then the",
        "  ledger entries and the accounts (their balance, debt and lots together) are written",
        "  with one command each (an account's write is its lock: a concurrent change is a",
        "  write conflict). Past the quota a record writes its meter, its account, its entry",
        "  and itself: on this server an update costs several times an insert, and more the",
        "  more indexes its collection has (each is rewritten), so accounts have none.",
        f"- **HTTP.** Alone, a record takes {p50('seq_http'):.1f} ms over HTTP against"
        f" {p50('seq_record'):.1f} ms",
        "  through the Python API: request validation, JSON and uvicorn cost client-side CPU that",
        "  competes with the database server for the same cores here.",
        "",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    load_before = load_average()
    async with stack(temporal=False) as s:
        await measure(s.mongo_uri, args, load_before)


async def measure(uri: str, args: argparse.Namespace, load_before: str) -> None:
    counter = CommandCounter()
    name = f"billing_bench_{uuid.uuid4().hex[:8]}"
    db = Database(uri, name, event_listeners=[counter], maxPoolSize=64)
    runtime = Runtime(
        settings=Settings(mongodb_uri=uri, mongodb_db=name, billing_api_token=TOKEN),
        config=load_config(EXAMPLE_CONFIG), db=db,
    )
    meters = Meters(db, runtime.config)
    http_server: uvicorn.Server | None = None
    serving: asyncio.Task[None] | None = None
    try:
        await db.ensure_indexes()
        one = await prepare_orgs(meters, runtime, "one", 1, "pro")
        fifty = await prepare_orgs(meters, runtime, "fifty", 50, "pro")
        free = await prepare_orgs(meters, runtime, "free", 50, "free")
        c, secs = args.concurrency, args.seconds
        short = max(1.0, secs / 4)
        results: dict[str, Result] = {}

        counter_doc = db["bench_counter"]
        await counter_doc.insert_one({"_id": "c", "n": 0})

        async def raw(_: int) -> None:
            await counter_doc.find_one_and_update(
                {"_id": "c"}, {"$inc": {"n": 1}}, return_document=ReturnDocument.AFTER)

        async def txn(_: int) -> None:
            async def work(session: Any) -> None:
                await counter_doc.find_one_and_update(
                    {"_id": "c"}, {"$inc": {"n": 1}}, session=session)
            await run_in_transaction(db.client, work)

        baseline = await load("baseline: raw find_one_and_update $inc", raw, concurrency=c,
                              seconds=secs, counter=counter)
        results["api_1"] = await load("Python API, 1 org", record_op(meters, one, "a1"),
                                      concurrency=c, seconds=secs, counter=counter)
        results["api_50"] = await load("Python API, 50 orgs", record_op(meters, fifty, "a50"),
                                       concurrency=c, seconds=secs, counter=counter)
        per_caller = [Meters(db, runtime.config) for _ in range(c)]

        async def as_processes(i: int) -> None:
            request = UsageRequest(org_id=one[0], run_id=f"p1-{i}", costs=COSTS)
            assert (await per_caller[i % c].record(request, utcnow())).applied

        results["api_1_processes"] = await load(
            "Python API, 1 org, one Meters per caller", as_processes, concurrency=c,
            seconds=secs, counter=counter)
        results["api_50_overflow"] = await load(
            "Python API, 50 orgs, overflowing", record_op(meters, free, "o50", units=1),
            concurrency=c, seconds=secs, counter=counter)

        port = free_port()
        http_server = uvicorn.Server(uvicorn.Config(
            create_app(runtime), host="127.0.0.1", port=port, log_level="warning",
            access_log=False, lifespan="on"))
        serving = asyncio.create_task(http_server.serve())
        await wait_for_port(port, "the HTTP app")
        async with LoadClient(
            f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
        ) as client:
            results["http_1"] = await load("HTTP, 1 org", http_op(client, one, "h1"),
                                           concurrency=c, seconds=secs, counter=counter)
            results["http_50"] = await load("HTTP, 50 orgs", http_op(client, fifty, "h50"),
                                            concurrency=c, seconds=secs, counter=counter)
            results["batch_50"] = await load(
                f"HTTP batch of {BATCH}, 50 orgs", batch_op(client, fifty, "b50", BATCH),
                concurrency=c, seconds=secs, counter=counter, per_op=BATCH)
            results["seq_http"] = await load("sequential: HTTP", http_op(client, fifty, "sh"),
                                             concurrency=1, seconds=short, counter=counter)
        results["seq_raw"] = await load("sequential: raw $inc", raw, concurrency=1,
                                        seconds=short, counter=counter)
        results["seq_txn"] = await load("sequential: transaction with one $inc", txn,
                                        concurrency=1, seconds=short, counter=counter)
        results["seq_record"] = await load("sequential: Meters.record",
                                           record_op(meters, fifty, "s"), concurrency=1,
                                           seconds=short, counter=counter)
        results["seq_overflow"] = await load("sequential: Meters.record, overflowing",
                                             record_op(meters, free, "so", units=1),
                                             concurrency=1, seconds=short, counter=counter)
        write_section("usage", report(results, baseline, args, load_before, load_average()),
                      args.output)
        print(f"wrote {args.output}")
    finally:
        if http_server is not None and serving is not None:
            http_server.should_exit = True
            await serving
        await db.client.drop_database(name)
        await db.close()


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__, seconds=8.0)
    return parser.parse_args()


if __name__ == "__main__":
    event_loop.run(main(parse_args()))  # as `billing dev` runs its HTTP app
