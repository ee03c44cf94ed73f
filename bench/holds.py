"""Balance-hold benchmark (SPEC §5.11): what a hold and its settlement add to a run, and twenty
concurrent holds of 75 units against 500 remaining.

    python bench/holds.py [--seconds 8] [--concurrency 16] [--rounds 20] [--output BENCHMARKS.md]

Starts its own SecantusDB server (unless `MONGODB_URI` is set) and measures, in one run on one
server, a run as a worker makes it:

- without a hold: one usage record (`Meters.record`, then `POST /v1/usage`);
- with a hold: `Meters.hold` then the usage record naming it, which settles it (then the same
  over HTTP: `POST /v1/orgs/{org}/holds` and `POST /v1/usage` with `hold_id`);

one caller alone and `--concurrency` callers over 50 organizations, and the twenty-into-500
case, `--rounds` times on a fresh organization each: through the HTTP app in this process, then
through two `billing serve` processes. The results go to the `holds` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from common import (
    TOKEN,
    CommandCounter,
    EngineProcess,
    Stack,
    load_average,
    load_parser,
    machine_rows,
    per_op,
    percentile,
    stack,
    write_section,
)
from http_load import LoadClient
from usage import COSTS, Op, Result, load, prepare_orgs

from billing.clock import utcnow
from billing.config import EXAMPLE_CONFIG, Settings, load_config
from billing.holds import Hold, HoldRequest
from billing.metering import UsageRequest
from billing.runtime import Runtime
from billing.store.database import Database
from billing.store.meters import Meters
from starter import event_loop
from starter.api.app import create_app
from starter.embedded import free_port, wait_for_port

TWENTY, UNITS = 20, 75  # against the free plan's 500-unit signup grant: six fit

#: What this script measured before the subscription standing was kept on the account, for
#: comparison: the findings of the current layout follow from the same script.
BEFORE = [
    "- **Before: the subscription read.** Until the standing was kept on the account a hold",
    "  also read `subscriptions` (11 commands a run). Two runs of this script on that commit,",
    "  on this machine with nothing else running: alternated 2.15 and 2.18 (2.15 and 2.14 over",
    "  HTTP), one phase after the other 2.22 and 2.16 (2.22 and 2.24 over HTTP), 16 callers",
    "  1.96 and 2.10 (2.13 and 2.09 over HTTP); the hold's call 0.51 and 0.52 ms slower than",
    "  the record that settles it.",
]


def plain_op(meters: Meters, orgs: list[str], tag: str) -> Op:
    async def op(i: int) -> None:
        request = UsageRequest(org_id=orgs[i % len(orgs)], run_id=f"{tag}-{i}", costs=COSTS)
        assert (await meters.record(request, utcnow())).applied
    return op


@dataclass
class Halves:
    """The two calls of each run with a hold, seconds: the hold's, then its settling record's."""

    hold: list[float] = field(default_factory=list)
    record: list[float] = field(default_factory=list)

    def ms(self, part: list[float]) -> float:
        return percentile(part, 0.5) * 1000


def held_op(meters: Meters, orgs: list[str], tag: str, halves: Halves | None = None) -> Op:
    async def op(i: int) -> None:
        org, run = orgs[i % len(orgs)], f"{tag}-{i}"
        started = time.perf_counter()
        granted = await meters.hold(org, HoldRequest(hold_id=run, costs=COSTS), utcnow())
        assert isinstance(granted, Hold), granted
        held = time.perf_counter()
        request = UsageRequest(org_id=org, run_id=run, costs=COSTS, hold_id=run)
        assert (await meters.record(request, utcnow())).applied
        if halves is not None:
            halves.hold.append(held - started)
            halves.record.append(time.perf_counter() - held)
    return op


async def _post(client: LoadClient, path: str, body: dict[str, object], status: int) -> None:
    response = await client.post(path, json=body)
    if response.status_code != status:
        raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")


def http_plain_op(client: LoadClient, orgs: list[str], tag: str) -> Op:
    async def op(i: int) -> None:
        await _post(client, "/v1/usage", {"org_id": orgs[i % len(orgs)], "run_id": f"{tag}-{i}",
                                          "costs": COSTS}, 200)
    return op


def http_held_op(client: LoadClient, orgs: list[str], tag: str) -> Op:
    async def op(i: int) -> None:
        org, run = orgs[i % len(orgs)], f"{tag}-{i}"
        await _post(client, f"/v1/orgs/{org}/holds", {"hold_id": run, "costs": COSTS}, 201)
        await _post(client, "/v1/usage", {"org_id": org, "run_id": run, "costs": COSTS,
                                          "hold_id": run}, 200)
    return op


async def alternate(name: str, plain: Op, held: Op, seconds: float) -> tuple[Result, Result]:
    """One caller alternating a run without a hold and one with, after a short unmeasured
    warm-up: both kinds see the same server, database size and machine load, which runs
    measured one phase after the other do not."""
    times: tuple[list[float], list[float]] = ([], [])
    sequence = itertools.count()
    for measured, duration in ((False, 0.5), (True, seconds)):
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            i = next(sequence)
            for op, kept in zip((plain, held), times, strict=True):
                started = time.perf_counter()
                await op(i)
                if measured:
                    kept.append(time.perf_counter() - started)
    without, with_hold = (Result(f"{name} {kind}", 1, len(kept), sum(kept), kept, {}, {}, {})
                          for kind, kept in zip(("without", "with"), times, strict=True))
    print(f"{name}: {per_run_ms(without):.2f} ms without a hold, {per_run_ms(with_hold):.2f} ms"
          f" with ({per_run_ms(with_hold) / per_run_ms(without):.2f})", flush=True)
    return without, with_hold


@dataclass
class Burst:
    """The twenty-into-500 case over several rounds: every hold's latency, each round's."""

    rounds: int
    granted: list[int]
    latencies: list[float]  # one per hold, seconds
    walls: list[float]  # one per round, seconds

    def ms(self, values: list[float], p: float) -> float:
        return percentile(values, p) * 1000


async def twenty_into_500(runtime: Runtime, clients: list[LoadClient], rounds: int) -> Burst:
    """Twenty holds of 75 units at once on a fresh free-plan organization (500 remaining),
    round robin over `clients`, `rounds` times."""
    burst = Burst(rounds, [], [], [])
    for r in range(rounds):
        org = f"burst-{uuid.uuid4().hex[:8]}-{r}"
        await runtime.accounts.register(org, utcnow())

        async def hold(i: int, org: str = org) -> int:
            started = time.perf_counter()
            response = await clients[i % len(clients)].post(
                f"/v1/orgs/{org}/holds", json={"hold_id": f"run-{i}", "units": UNITS})
            burst.latencies.append(time.perf_counter() - started)
            if response.status_code not in (201, 409):
                raise RuntimeError(f"hold: {response.status_code} {response.text[:300]}")
            return response.status_code

        started = time.perf_counter()
        statuses = await asyncio.gather(*(hold(i) for i in range(TWENTY)))
        burst.walls.append(time.perf_counter() - started)
        burst.granted.append(statuses.count(201))
    return burst


def per_run_ms(result: Result) -> float:
    return sum(result.latencies) / result.ops * 1000


def commands_per_run(result: Result) -> float:
    return sum(result.commands.values()) / result.ops


def ratios(results: dict[str, Result]) -> dict[str, float]:
    """What a run with a hold costs over one without, per row of the report."""
    return {
        "alone": per_run_ms(results["seq_held"]) / per_run_ms(results["seq_plain"]),
        "http alone": per_run_ms(results["seq_http_held"]) / per_run_ms(results["seq_http_plain"]),
        "alternated": per_run_ms(results["alt_held"]) / per_run_ms(results["alt_plain"]),
        "http alternated": (per_run_ms(results["alt_http_held"])
                            / per_run_ms(results["alt_http_plain"])),
        "loaded": results["plain_50"].rate / results["held_50"].rate,
        "http loaded": results["http_plain_50"].rate / results["http_held_50"].rate,
    }


def tables(results: dict[str, Result], bursts: dict[str, Burst],
           args: argparse.Namespace) -> list[str]:
    """The ratio rows, the commands per run and the twenty-into-500 rows."""

    def row(label: str, plain: str, held: str, alone: bool) -> str:
        p, h = results[plain], results[held]
        if alone:
            return (f"| {label} | 1 | {per_run_ms(p):.2f} ms | {per_run_ms(h):.2f} ms |"
                    f" {per_run_ms(h) / per_run_ms(p):.2f} |")
        return (f"| {label} | {args.concurrency} | {p.rate:,.0f} runs/s | {h.rate:,.0f} runs/s |"
                f" {p.rate / h.rate:.2f} |")

    def commands(key: str, label: str) -> str:
        r = results[key]
        return (f"| {label} | {commands_per_run(r):.2f} | {per_op(r.commands, r.ops)} |"
                f" {r.failures.get('WriteConflict', 0) / r.ops:.2f} |")

    def burst_row(key: str, label: str) -> str:
        b = bursts[key]
        exact = sum(1 for g in b.granted if g == 6)
        return (f"| {label} | {b.rounds} | {exact} of {b.rounds} |"
                f" {b.ms(b.latencies, 0.5):.1f} | {b.ms(b.latencies, 0.99):.1f} |"
                f" {b.ms(b.walls, 0.5):.1f} | {max(b.walls) * 1000:.1f} |")

    return [
        "| path | callers | run without a hold | run with a hold | ratio |",
        "|---|---|---|---|---|",
        row("Python API (`Meters`)", "seq_plain", "seq_held", alone=True),
        row("HTTP", "seq_http_plain", "seq_http_held", alone=True),
        row("Python API (`Meters`), runs alternated", "alt_plain", "alt_held", alone=True),
        row("HTTP, runs alternated", "alt_http_plain", "alt_http_held", alone=True),
        row("Python API (`Meters`), 50 organizations", "plain_50", "held_50", alone=False),
        row("HTTP, 50 organizations", "http_plain_50", "http_held_50", alone=False),
        "",
        "MongoDB commands per run and write conflicts per run:",
        "",
        "| run | commands | commands per run | write conflicts |",
        "|---|---|---|---|",
        commands("seq_plain", "without a hold, one caller"),
        commands("seq_held", "with a hold, one caller"),
        commands("plain_50", f"without a hold, {args.concurrency} callers"),
        commands("held_50", f"with a hold, {args.concurrency} callers"),
        "",
        f"Twenty concurrent holds of {UNITS} units against 500 remaining (a fresh organization",
        "each round; six fit): how many rounds granted exactly six, each hold's latency and the",
        "whole burst's.",
        "",
        "| through | rounds | exactly six granted | hold p50 ms | hold p99 ms |"
        " burst p50 ms | burst max ms |",
        "|---|---|---|---|---|---|---|",
        burst_row("one", "the HTTP app in this process"),
        burst_row("two", "two `billing serve` processes, round robin"),
    ]


def findings(results: dict[str, Result], halves: Halves,
             args: argparse.Namespace) -> list[str]:
    """What the numbers say, and why."""
    found = ratios(results)
    over = [name for name, ratio in found.items() if ratio > 2]
    verdict = ("met in every row" if not over else
               f"not met in this run ({', '.join(over)} above 2)")
    extra = round(halves.ms(halves.hold) - halves.ms(halves.record), 2) + 0.0  # no "-0.00"
    drift = round(halves.ms(halves.record) - results["seq_plain"].percentile(0.5), 2) + 0.0
    return [
        f"- **One caller alone: {found['alone']:.2f} times a run without a hold"
        f" ({found['http alone']:.2f} over HTTP).** A run with a hold is two calls, so two",
        "  transactions. The hold's reads the account, which keeps the subscription standing (a",
        "  hold refuses a past-due organization as the gate does), and the meters that keep the",
        "  organization's holds (this week's, and last week's during a week's first day), then",
        "  writes the meter, which the hold goes on, and inserts the grant's record: the four",
        "  commands and the commit of a usage record. Settling costs the usage record nothing",
        "  more: its meter update, which it makes anyway, takes the hold off"
        f" ({commands_per_run(results['seq_held']):.0f} commands a run against",
        f"  {commands_per_run(results['seq_plain']):.0f}; 11 while a hold also read"
        " `subscriptions`, 13 in the layout before). Medians:",
        f"  the hold's call {halves.ms(halves.hold):.2f} ms, the record that settles it"
        f" {halves.ms(halves.record):.2f} ms, a record",
        f"  without a hold {results['seq_plain'].percentile(0.5):.2f} ms.",
        f"- **{args.concurrency} callers: {found['loaded']:.2f} times"
        f" ({found['http loaded']:.2f} over HTTP).** Holds join the usage records' group",
        "  commit, but a run with a hold is two calls one after the other, each waiting for a",
        "  group, and each group writes the meter of every organization it touches: a run with a",
        "  hold writes its meter twice (the grant's group, then the settling record's) where a",
        "  run without writes it once, and on this server an update costs several times an",
        "  inserted document.",
        f"- **The goal of at most 2 is {verdict}.** A run with a hold costs at most twice",
        "  a run without when a hold's call costs no more than a usage record's, and it now sends",
        "  the same commands. Alternating the two kinds of run in one loop, so that both see the",
        "  same server, database and machine load, a run with a hold cost"
        f" {found['alternated']:.2f} times one",
        f"  without ({found['http alternated']:.2f} over HTTP). The rows measured one phase after"
        " the other move by a tenth",
        "  or two either way from run to run (the later phase runs on a bigger database, after",
        f"  other loads): here the hold's call took {extra:+.2f} ms more than the record that"
        " settles it,",
        "  which sends the same commands as a record without a hold, and that record took"
        f" {drift:+.2f} ms",
        "  more than one without a hold in the phase before. Below two a hold would have to",
        "  skip writing its meter (the lock that orders grants across processes) or its record",
        "  in `holds` (the answer of a repeated `hold_id`, for good and without a sweep).",
        *BEFORE,
        "- **Twenty at once.** Through one process the twenty holds are decided one after the",
        "  other in one or two groups. Through two processes each process's groups write the",
        "  organization's meter, so they write-conflict and `run_in_transaction` restarts the",
        "  loser after a jittered backoff until it has seen the other's holds: correct in any",
        "  number of processes, at the price of the burst's tail latency.",
    ]


def report(results: dict[str, Result], bursts: dict[str, Burst], halves: Halves,
           args: argparse.Namespace, load_before: str, load_after: str) -> str:
    lines = [
        "## Balance holds (`bench/holds.py`; SPEC §5.11)",
        "",
        "A run without a hold is one usage record; a run with a hold is the hold, then the usage",
        "record that names it and settles it in its own transaction. Both kinds of run are",
        f"measured in the same run of the script, {args.seconds:g} s each after a short warm-up",
        "(one caller: one phase after the other, and also alternated in one loop),",
        "against one SecantusDB server, on organizations of the `pro` plan (every hold granted).",
        "The machine was shared with other test runs while this ran (load average "
        f"{load_before} at the start, {load_after} at the end): compare the rows with each",
        "other, not across runs; the ratios are what count.",
        "",
        *machine_rows(temporal=False),
        "",
        "`ratio`: what a run with a hold costs over one without (time per run for one caller,"
        " throughput",
        f"lost for {args.concurrency} callers over 50 organizations). Goal: at most 2.",
        "",
        *tables(results, bursts, args),
        "",
        *findings(results, halves, args),
        "",
    ]
    return "\n".join(lines)


@dataclass
class Measures:
    """The loads of one run of the script and what they measured, by key."""

    args: argparse.Namespace
    counter: CommandCounter
    orgs: list[str]
    results: dict[str, Result] = field(default_factory=dict)

    async def measure(self, key: str, name: str, op: Op, *, alone: bool) -> None:
        seconds = max(1.0, self.args.seconds / 2) if alone else self.args.seconds
        self.results[key] = await load(name, op, concurrency=1 if alone else self.args.concurrency,
                                       seconds=seconds, counter=self.counter)

    async def python_api(self, meters: Meters) -> Halves:
        """Both kinds of run through `Meters`, alone then loaded."""
        orgs, halves = self.orgs, Halves()
        await self.measure("seq_plain", "alone: run without a hold",
                           plain_op(meters, orgs, "sp"), alone=True)
        await self.measure("seq_held", "alone: run with a hold",
                           held_op(meters, orgs, "sh", halves), alone=True)
        await self.measure("plain_50", "50 orgs: run without a hold",
                           plain_op(meters, orgs, "p50"), alone=False)
        await self.measure("held_50", "50 orgs: run with a hold",
                           held_op(meters, orgs, "h50"), alone=False)
        self.results["alt_plain"], self.results["alt_held"] = await alternate(
            "alone, alternated", plain_op(meters, orgs, "ap"), held_op(meters, orgs, "ah"),
            self.args.seconds)
        return halves

    async def http(self, client: LoadClient) -> None:
        """Both kinds of run through the HTTP app, alone then loaded."""
        orgs = self.orgs
        await self.measure("seq_http_plain", "alone: HTTP run without a hold",
                           http_plain_op(client, orgs, "hp"), alone=True)
        await self.measure("seq_http_held", "alone: HTTP run with a hold",
                           http_held_op(client, orgs, "hh"), alone=True)
        await self.measure("http_plain_50", "50 orgs: HTTP run without a hold",
                           http_plain_op(client, orgs, "hp50"), alone=False)
        await self.measure("http_held_50", "50 orgs: HTTP run with a hold",
                           http_held_op(client, orgs, "hh50"), alone=False)
        self.results["alt_http_plain"], self.results["alt_http_held"] = await alternate(
            "alone, HTTP, alternated", http_plain_op(client, orgs, "hap"),
            http_held_op(client, orgs, "hah"), self.args.seconds)


async def through_http(measures: Measures, runtime: Runtime, s: Stack) -> dict[str, Burst]:
    """The HTTP rows (the app served in this process), then the twenty-into-500 case through
    it and through two `billing serve` processes."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(runtime), host="127.0.0.1", port=port, log_level="warning",
        access_log=False, lifespan="on"))
    serving = asyncio.create_task(server.serve())
    bursts: dict[str, Burst] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        await wait_for_port(port, "the HTTP app")
        async with LoadClient(f"http://127.0.0.1:{port}", headers=headers) as client:
            await measures.http(client)
            bursts["one"] = await twenty_into_500(runtime, [client], measures.args.rounds)
    finally:
        server.should_exit = True
        await serving
    async with EngineProcess.http_app(runtime.settings, s) as one, \
            EngineProcess.http_app(runtime.settings, s) as two, \
            LoadClient(one.base_url, headers=headers) as first, \
            LoadClient(two.base_url, headers=headers) as second:
        bursts["two"] = await twenty_into_500(runtime, [first, second], measures.args.rounds)
    for key, burst in bursts.items():
        print(f"twenty into 500 through {key}: granted {burst.granted}, hold p50"
              f" {burst.ms(burst.latencies, 0.5):.1f} ms, p99"
              f" {burst.ms(burst.latencies, 0.99):.1f} ms", flush=True)
    return bursts


async def main(args: argparse.Namespace) -> None:
    load_before = load_average()
    async with stack(temporal=False) as s:
        counter = CommandCounter()
        name = f"billing_bench_{uuid.uuid4().hex[:8]}"
        db = Database(s.mongo_uri, name, event_listeners=[counter], maxPoolSize=64)
        settings = Settings(mongodb_uri=s.mongo_uri, mongodb_db=name, billing_api_token=TOKEN)
        runtime = Runtime(settings=settings, config=load_config(EXAMPLE_CONFIG), db=db)
        try:
            await db.ensure_indexes()
            orgs = await prepare_orgs(runtime.meters, runtime, "pro", 50, "pro")
            measures = Measures(args, counter, orgs)
            halves = await measures.python_api(runtime.meters)
            bursts = await through_http(measures, runtime, s)
            write_section("holds", report(measures.results, bursts, halves, args, load_before,
                                          load_average()), args.output)
            print(f"wrote {args.output}")
        finally:
            await db.client.drop_database(name)
            await db.close()


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__, seconds=8.0)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of twenty holds")
    return parser.parse_args()


if __name__ == "__main__":
    event_loop.run(main(parse_args()))  # as `billing dev` runs its HTTP app
