"""Webhook benchmark: signed Stripe event -> applied ledger entry, end to end, against the bare
Temporal floor measured in the same run.

    python bench/webhook.py [--events 1000] [--concurrency 16] [--orgs 100]

The engine runs as deployed, each part its own process: the HTTP app (`billing serve`, uvicorn)
and the worker, on SecantusDB and the Temporal dev server (started here unless `MONGODB_URI` /
`TEMPORAL_ADDRESS` are set). This process only generates load:

- webhook: N distinct pack purchases (`payment_intent.succeeded`, organization and pack in
  metadata; the worker reads the Checkout session behind each from Stripe, here localstripe
  on 127.0.0.1, as SPEC §5.5 asks) signed and posted `concurrency` at a time; timed from the
  first post until every event's workflow has completed, with the acknowledgement latency of
  each post;
- baseline: N `BenchWorkflow`s (bench/bare.py: one no-op activity) started `concurrency` at a
  time through the Temporal client, served by their own worker process; timed the same way.
  It runs before and after the webhook load; the ratio divides by their mean.
- reference: the same with `BenchLocalWorkflow` (its one no-op step a local activity, as the
  event's steps are), also before and after: the floor of the engine's own workflow shape.
- one at a time: the latency of a single event (acknowledgement, then completion) and of a single
  bare workflow, to split the end-to-end time into its steps.

The CPU time of every process per event says where the time goes; the worker reports the MongoDB
commands its activities sent. Results go to the `webhook` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bare import BenchLocalWorkflow, BenchWorkflow
from common import (
    EngineProcess,
    Profiles,
    Run,
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
    wait_until,
    write_section,
)
from http_load import LoadClient
from temporalio.client import Client

from billing.clock import utcnow
from billing.config import BillingConfig, load_config
from billing.runtime import Runtime
from billing.store.database import Database
from starter.sample_events import sample_event, signed_body
from workflows.stripe_event import stripe_workflow_id

EVENT_TYPE = "payment_intent.succeeded"
WARMUP = 20
SEQUENTIAL = 20
DONE_TIMEOUT_S = 600.0


@dataclass
class Load:
    """One load: the starts (posts or client starts) and when everything was done."""

    name: str
    starts: Run
    done_s: float
    cpu: dict[str, float]
    commands: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.starts.ops / self.done_s


@dataclass
class Alone:
    """Steps of single operations, one at a time: mean milliseconds."""

    ack_ms: float
    done_ms: float


async def completed(client: Client, task_queue: str) -> int:
    found = await client.count_workflows(
        f'TaskQueue = "{task_queue}" AND ExecutionStatus = "Completed"')
    return found.count


async def failed(client: Client, task_queue: str) -> int:
    found = await client.count_workflows(
        f'TaskQueue = "{task_queue}" AND ExecutionStatus != "Completed" '
        f'AND ExecutionStatus != "Running"')
    return found.count


async def until_completed(client: Client, task_queue: str, total: int) -> float:
    async def done() -> bool:
        if await failed(client, task_queue):
            raise RuntimeError(f"workflows on {task_queue} failed: see `billing failures`")
        return await completed(client, task_queue) >= total
    return await wait_until(done, timeout_s=DONE_TIMEOUT_S, what=f"{total} workflows",
                            interval_s=0.25)


# ---- the webhook --------------------------------------------------------------------------


def purchases(config: BillingConfig, orgs: list[str], count: int) -> list[dict[str, Any]]:
    return [sample_event(EVENT_TYPE, config, org=orgs[i % len(orgs)]) for i in range(count)]


def poster(http: LoadClient, secret: str) -> Any:
    async def post(event: dict[str, Any]) -> None:
        body, signature = signed_body(event, secret)
        response = await http.post("/stripe/webhook", content=body, headers={
            "Stripe-Signature": signature, "Content-Type": "application/json"})
        if response.status_code != 200 or response.json()["status"] != "started":
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text}")
    return post


async def webhook_load(s: Stack, runtime: Runtime, orgs: list[str], args: argparse.Namespace,
                       ) -> tuple[Load, Alone]:
    settings = runtime.settings
    client = s.temporal()
    queue = settings.temporal_task_queue

    app = EngineProcess.http_app(settings, s)
    worker = EngineProcess.worker(settings, s)
    async with app, LoadClient(app.base_url) as http:
        await worker.start()
        try:
            post = poster(http, settings.webhook_secrets[0])
            await run_all(purchases(runtime.config, orgs, WARMUP), post, args.concurrency)
            await until_completed(client, queue, WARMUP)

            acks, dones = [], []
            for event in purchases(runtime.config, orgs, SEQUENTIAL):
                started = time.perf_counter()
                await post(event)
                acked = time.perf_counter()
                await client.get_workflow_handle(stripe_workflow_id(event["id"])).result()
                acks.append(acked - started)
                dones.append(time.perf_counter() - started)
            alone = Alone(sum(acks) / len(acks) * 1000, sum(dones) / len(dones) * 1000)

            before_total = WARMUP + SEQUENTIAL
            events = purchases(runtime.config, orgs, args.events)
            async with Profiles(args.profile, s.pids, "webhook"):
                cpu_before = cpu_seconds(s.pids)
                started = time.perf_counter()
                starts = await run_all(events, post, args.concurrency)
                done_at = await until_completed(client, queue, before_total + args.events)
                cpu = cpu_used(cpu_before, cpu_seconds(s.pids))
        finally:
            commands = await worker.stop()
    return Load("webhook", starts, done_at - started, cpu, commands), alone


async def check_exactly_once(db: Database, total: int) -> None:
    """Every event applied once: one topup entry per payment, one applied outcome per event."""
    entries = await db.ledger.count_documents({"kind": "topup"})
    keys = len(await db.ledger.distinct("key", {"kind": "topup"}))
    applied = await db.stripe_events.count_documents({"outcome": "applied"})
    if not entries == keys == applied == total:
        raise RuntimeError(f"expected {total} purchases applied once: {entries} entries, "
                           f"{keys} keys, {applied} applied outcomes")


# ---- the baseline -------------------------------------------------------------------------


async def bare_load(s: Stack, settings_db: str, args: argparse.Namespace, sequential: bool,
                    local: bool = False) -> tuple[Load, Alone | None]:
    """`BenchWorkflow`s (or `BenchLocalWorkflow`s when `local`), first one at a time when
    `sequential`."""
    settings = s.settings(settings_db)
    client = s.temporal()
    queue = settings.temporal_task_queue
    tag = uuid.uuid4().hex[:8]

    run = BenchLocalWorkflow.run if local else BenchWorkflow.run

    async def start(n: int) -> None:
        await client.start_workflow(run, n, id=f"bench-{tag}-{n}", task_queue=queue)

    worker = EngineProcess.worker(settings, s, kind="bare")
    await worker.start()
    try:
        await run_all(range(WARMUP), start, args.concurrency)
        await until_completed(client, queue, WARMUP)
        alone = None
        if sequential:
            acks, dones = [], []
            for n in range(WARMUP, WARMUP + SEQUENTIAL):
                started = time.perf_counter()
                handle = await client.start_workflow(run, n, id=f"bench-{tag}-{n}",
                                                     task_queue=queue)
                acked = time.perf_counter()
                await handle.result()
                acks.append(acked - started)
                dones.append(time.perf_counter() - started)
            alone = Alone(sum(acks) / len(acks) * 1000, sum(dones) / len(dones) * 1000)
        before_total = WARMUP + (SEQUENTIAL if sequential else 0)
        label = "bare-local" if local else "bare"
        async with Profiles(args.profile if sequential else None, s.pids, label):
            cpu_before = cpu_seconds(s.pids)
            started = time.perf_counter()
            starts = await run_all(range(before_total, before_total + args.events), start,
                                   args.concurrency)
            done_at = await until_completed(client, queue, before_total + args.events)
            cpu = cpu_used(cpu_before, cpu_seconds(s.pids))
    finally:
        await worker.stop()
    return Load(label, starts, done_at - started, cpu, {}), alone


# ---- the report ---------------------------------------------------------------------------


def mean_cpu(loads: list[Load]) -> dict[str, float]:
    return {role: sum(load.cpu.get(role, 0.0) for load in loads) / len(loads)
            for role in loads[0].cpu}


def report(hook: Load, hook_alone: Alone, bares: list[Load], bare_alone: Alone,
           locals_: list[Load], local_alone: Alone, args: argparse.Namespace, load_before: str,
           load_after: str) -> str:
    bare_rate = sum(b.rate for b in bares) / len(bares)
    local_rate = sum(b.rate for b in locals_) / len(locals_)
    sent = hook.commands.get("sent", {})
    processed = args.events + WARMUP + SEQUENTIAL
    conflicts = hook.commands.get("failures", {}).get("WriteConflict", 0) / processed
    bare_cpu, local_cpu = mean_cpu(bares), mean_cpu(locals_)
    cpu_hook = sum(hook.cpu.values()) * 1000 / args.events
    cpu_bare = sum(bare_cpu.values()) * 1000 / args.events
    cpu_local = sum(local_cpu.values()) * 1000 / args.events
    cores = os.cpu_count() or 1
    lines = [
        "## Webhook: signed event to applied ledger entry (`bench/webhook.py`)",
        "",
        f"{args.events:,} distinct pack purchases (`{EVENT_TYPE}`, organization and pack in",
        f"metadata, spread over {args.orgs} organizations), signed and posted to",
        f"`POST /stripe/webhook`, {args.concurrency} at a time. The HTTP app (`billing serve`,",
        "uvicorn) and the worker each run in their own process, as deployed and as `billing dev`",
        "runs them (beside the same SecantusDB, Temporal dev server and `localstripe`), so this",
        "is also the figure of `billing dev`. The purchase's one activity, a local activity",
        "(README, \"Stripe events\"), reads the Checkout session behind the payment (SPEC",
        "§5.5: quantities) from `localstripe` on 127.0.0.1, which answers that the payment has",
        "none, then writes. The time runs from",
        "the first post until every event's `StripeEventWorkflow` has completed (its ledger entry",
        "is written by its activity, just before). The baseline is `BenchWorkflow`",
        "(`bench/bare.py`): one no-op activity, started through the Temporal client at the same",
        "concurrency and served by its own worker process on the same Temporal server, run before",
        "and after the webhook load; the ratio divides by their mean. The reference is",
        "`BenchLocalWorkflow`, the same with its no-op step a local activity, the floor of the",
        "event's own workflow shape; it runs right after the first baseline and right before",
        "the second (the dev server's cost per workflow grows with the workflows it retains, so",
        "each pair's mean is measured at the webhook's point). Afterwards every purchase",
        "was checked applied exactly once (one ledger entry and one `applied` outcome each).",
        f"Load average: {load_before} at the start, {load_after} at the end.",
        "",
        *machine_rows(temporal=True),
        "",
        "| load | events | per second | start p50 ms | start p99 ms | ratio |",
        "|---|---|---|---|---|---|",
        *[f"| baseline {i + 1}: bare workflow, one no-op activity | {b.starts.ops:,} |"
          f" {b.rate:,.1f} | {b.starts.p(0.5):.1f} | {b.starts.p(0.99):.1f} | |"
          for i, b in enumerate(bares)],
        *[f"| reference {i + 1}: bare workflow, one no-op local activity | {b.starts.ops:,} |"
          f" {b.rate:,.1f} | {b.starts.p(0.5):.1f} | {b.starts.p(0.99):.1f} | |"
          for i, b in enumerate(locals_)],
        f"| **webhook -> ledger entry, end to end** | {hook.starts.ops:,} |"
        f" **{hook.rate:,.1f}** | {hook.starts.p(0.5):.1f} | {hook.starts.p(0.99):.1f} |"
        f" **{hook.rate / bare_rate:.2f}** |",
        "",
        f"- **Acknowledgement latency** of the webhook under this load: p50"
        f" {hook.starts.p(0.5):.1f} ms, p99 {hook.starts.p(0.99):.1f} ms",
        "  ('start': until the HTTP answer; for the baseline, until the client's start returned).",
        f"- The posts took {hook.starts.seconds:.1f} s ({hook.starts.rate:,.1f} acks/s), the"
        f" workflows {hook.done_s:.1f} s;",
        f"  the baselines' starts took {sum(b.starts.seconds for b in bares) / len(bares):.1f} s"
        f" on average, their workflows {sum(b.done_s for b in bares) / len(bares):.1f} s.",
        f"- CPU per event, all processes: {cpu_hook:.1f} ms against {cpu_bare:.1f} ms per bare",
        f"  workflow (ratio {cpu_bare / cpu_hook:.2f}). With {cores} cores that allows at most"
        f" {1000 * cores / cpu_hook:,.0f} events/s",
        f"  and {1000 * cores / cpu_bare:,.0f} bare workflows/s. Other work on the machine moves"
        " the wall-clock ratio,",
        "  not the CPU ratio.",
        f"- Against the reference (one local activity, {local_rate:,.1f} workflows/s,"
        f" {cpu_local:.1f} ms of CPU each) the webhook's",
        f"  ratio is {hook.rate / local_rate:.2f} (CPU {cpu_local / cpu_hook:.2f}): what the engine"
        " adds to the cheapest workflow of its shape.",
        "",
        "### Where the time goes",
        "",
        f"One at a time ({SEQUENTIAL} each, mean ms): the acknowledgement, then the completion",
        "seen by the client.",
        "",
        "| one event | acknowledged | completed | completion after the ack |",
        "|---|---|---|---|",
        f"| bare workflow (client start) | {bare_alone.ack_ms:.1f} | {bare_alone.done_ms:.1f} |"
        f" {bare_alone.done_ms - bare_alone.ack_ms:.1f} |",
        f"| bare workflow, local activity | {local_alone.ack_ms:.1f} | {local_alone.done_ms:.1f} |"
        f" {local_alone.done_ms - local_alone.ack_ms:.1f} |",
        f"| webhook purchase | {hook_alone.ack_ms:.1f} | {hook_alone.done_ms:.1f} |"
        f" {hook_alone.done_ms - hook_alone.ack_ms:.1f} |",
        "",
        "CPU milliseconds per event by process under the concurrent load (from /proc; the",
        "baseline's is the mean of its runs):",
        "",
        *cpu_table([("bare workflow", bare_cpu, args.events),
                    ("bare, local activity", local_cpu, args.events),
                    ("webhook", hook.cpu, args.events)]),
        "",
        f"MongoDB commands per event sent by the worker's activities:"
        f" {sum(sent.values()) / processed:.1f}",
        f"({per_op(sent, processed)}); {conflicts:.2f} write conflicts per event.",
        "",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    load_before = load_average()
    async with stack(temporal=True) as s:
        name = f"billing_bench_{uuid.uuid4().hex[:8]}"
        settings = s.settings(name)
        db = Database(s.mongo_uri, name)
        runtime = Runtime(settings=settings, config=load_config(settings.billing_config), db=db)
        try:
            await db.ensure_indexes()
            orgs = [f"bench-{i:04d}" for i in range(args.orgs)]
            await run_all(orgs, lambda org: runtime.accounts.register(org, utcnow()),
                          args.concurrency)
            bares: list[Load] = []
            first, bare_alone = await bare_load(s, name, args, sequential=True)
            bares.append(first)
            print(f"baseline: {first.rate:.1f} workflows/s", flush=True)
            local_first, local_alone = await bare_load(s, name, args, sequential=True, local=True)
            print(f"reference: {local_first.rate:.1f} workflows/s", flush=True)
            hook, hook_alone = await webhook_load(s, runtime, orgs, args)
            print(f"webhook: {hook.rate:.1f} events/s, ack p50 {hook.starts.p(0.5):.1f} ms"
                  f" p99 {hook.starts.p(0.99):.1f} ms", flush=True)
            await check_exactly_once(db, args.events + WARMUP + SEQUENTIAL)
            local_second, _ = await bare_load(s, name, args, sequential=False, local=True)
            print(f"reference again: {local_second.rate:.1f} workflows/s", flush=True)
            second, _ = await bare_load(s, name, args, sequential=False)
            bares.append(second)
            print(f"baseline again: {second.rate:.1f} workflows/s", flush=True)
            assert bare_alone is not None and local_alone is not None
            text = report(hook, hook_alone, bares, bare_alone, [local_first, local_second],
                          local_alone, args, load_before, load_average())
            write_section("webhook", text, args.output)
            print(json.dumps({"webhook_per_s": hook.rate,
                              "bare_per_s": [b.rate for b in bares],
                              "bare_local_per_s": [local_first.rate, local_second.rate]}))
            print(f"wrote {args.output}")
        finally:
            await db.client.drop_database(name)
            await db.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="sample the processes with py-spy during the loads (skews timing)")
    output_arg(parser)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
