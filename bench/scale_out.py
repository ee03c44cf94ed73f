"""Scale-out benchmark: two `billing serve` and two workers on the same servers.

    python bench/scale_out.py [--seconds 8] [--concurrency 16] [--events 400]

Measured in one run, on SecantusDB and the Temporal dev server (started here unless
`MONGODB_URI` / `TEMPORAL_ADDRESS` are set):

- usage through `POST /v1/usage`: one API process, then two behind a round robin, for one hot
  organization and for 50 organizations (throughput and latency percentiles);
- a redelivery storm: `--events` distinct purchases, each posted twice to each API, shuffled,
  served by two workers; timed until every event is applied, then checked applied exactly once.

Results go to the `scale_out` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
import uuid
from dataclasses import dataclass

from common import (
    TOKEN,
    EngineProcess,
    Run,
    Stack,
    load_average,
    load_parser,
    machine_rows,
    run_all,
    stack,
    wait_until,
    write_section,
)
from http_load import LoadClient

from billing.clock import utcnow
from billing.config import load_config
from billing.runtime import Runtime
from billing.store.database import Database
from starter.sample_events import sample_event, signed_body

PACK_UNITS = 500000


@dataclass
class Usage:
    name: str
    run: Run

    @property
    def rate(self) -> float:
        return self.run.rate


async def usage_load(name: str, apis: list[LoadClient], orgs: list[str],
                     args: argparse.Namespace) -> Usage:
    """`POST /v1/usage` from `concurrency` callers for `seconds`, round robin over `apis`."""
    sequence = itertools.count()
    latencies: list[float] = []
    tag = uuid.uuid4().hex[:6]

    async def caller(until: float) -> None:
        while time.perf_counter() < until:
            i = next(sequence)
            started = time.perf_counter()
            response = await apis[i % len(apis)].post("/v1/usage", json={
                "org_id": orgs[i % len(orgs)], "run_id": f"{tag}-{i}", "units": 1})
            if response.status_code != 200 or not response.json()["applied"]:
                raise RuntimeError(f"usage failed: {response.status_code} {response.text}")
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(caller(began + args.seconds) for _ in range(args.concurrency)))
    result = Usage(name, Run(len(latencies), time.perf_counter() - began, latencies))
    print(f"{name:<45} {result.rate:7.0f}/s  p50 {result.run.p(0.5):6.1f} ms"
          f"  p99 {result.run.p(0.99):6.1f} ms", flush=True)
    return result


@dataclass
class Storm:
    deliveries: int
    events: int
    acked_s: float
    applied_s: float
    started: int


async def storm(apis: list[LoadClient], runtime: Runtime, orgs: list[str],
                args: argparse.Namespace) -> Storm:
    secret = runtime.settings.webhook_secrets[0]
    events = [sample_event("payment_intent.succeeded", runtime.config, org=orgs[i % len(orgs)])
              for i in range(args.events)]
    deliveries = [(event, api) for event in events for api in apis for _ in range(2)]
    random.Random(7).shuffle(deliveries)
    answers: list[str] = []

    async def post(delivery: tuple[dict[str, object], LoadClient]) -> None:
        event, api = delivery
        body, signature = signed_body(event, secret)
        response = await api.post("/stripe/webhook", content=body, headers={
            "Stripe-Signature": signature, "Content-Type": "application/json"})
        if response.status_code != 200:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text}")
        answers.append(response.json()["status"])

    ids = [str(event["id"]) for event in events]
    began = time.perf_counter()
    await run_all(deliveries, post, args.concurrency)
    acked = time.perf_counter() - began

    async def applied() -> bool:
        found = await runtime.db.stripe_events.count_documents({"_id": {"$in": ids}})
        return found == len(ids)

    await wait_until(applied, timeout_s=600, what=f"{len(ids)} events", interval_s=0.25)
    done = time.perf_counter() - began
    outcomes = {doc["outcome"] async for doc in runtime.db.stripe_events.find(
        {"_id": {"$in": ids}}, {"outcome": 1})}
    if outcomes != {"applied"}:
        raise RuntimeError(f"outcomes {outcomes}: every purchase must be applied")
    credited = await runtime.db.ledger.count_documents(
        {"kind": "topup", "org_id": {"$in": orgs}})
    if credited != len(ids):
        raise RuntimeError(f"{credited} ledger credits for {len(ids)} purchases")
    print(f"storm: {len(deliveries)} deliveries acknowledged in {acked:.1f} s, "
          f"{len(ids)} events applied in {done:.1f} s", flush=True)
    return Storm(len(deliveries), len(ids), acked, done, answers.count("started"))


def report(usage: list[Usage], result: Storm, args: argparse.Namespace, load_before: str,
           load_after: str) -> str:
    base = {u.name.split(",")[1]: u.rate for u in usage if u.name.startswith("1 API")}
    rows = [f"| {u.name} | {u.run.ops:,} | {u.rate:,.0f} | {u.run.p(0.5):.1f} |"
            f" {u.run.p(0.99):.1f} | {u.rate / base[u.name.split(',')[1]]:.2f} |" for u in usage]
    return "\n".join([
        "## Scale-out (`bench/scale_out.py`): two APIs and two workers",
        "",
        f"Each usage load runs {args.seconds:g} s with {args.concurrency} concurrent callers,",
        "round robin over the API processes (`billing serve`, each its own process); records of",
        "1 unit on organizations of the free plan's quota. `ratio` compares two APIs with one on",
        "the same organizations. All processes share the machine's cores with the servers.",
        f"Load average: {load_before} at the start, {load_after} at the end.",
        "",
        *machine_rows(temporal=True),
        "",
        "| load | records | per second | p50 ms | p99 ms | ratio |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Redelivery storm: {result.events:,} distinct purchases, each posted twice to each of",
        f"the two APIs ({result.deliveries:,} deliveries, shuffled, {args.concurrency} at a time),",
        "served by two workers: every delivery answered 200 within"
        f" {result.acked_s:.1f} s, exactly {result.started:,} started a workflow, and every",
        f"event was applied once (one credit each) {result.applied_s:.1f} s after the first post",
        f"({result.events / result.applied_s:.1f} events/s).",
        "",
        "- **One hot organization.** Within one API process the group commit applies its",
        "  records one after the other in shared transactions; two API processes writing the",
        "  same meter document conflict at MongoDB and retry, so the second process adds",
        "  little for one organization (route an organization to one replica when it writes",
        "  at a high rate; README, Scaling out). Many organizations spread over both.",
        "",
    ])


async def main(args: argparse.Namespace) -> None:
    load_before = load_average()
    async with stack(temporal=True) as s:
        await measure(s, args, load_before)


async def measure(s: Stack, args: argparse.Namespace, load_before: str) -> None:
    name = f"billing_bench_{uuid.uuid4().hex[:8]}"
    settings = s.settings(name)
    db = Database(s.mongo_uri, name)
    runtime = Runtime(settings=settings, config=load_config(settings.billing_config), db=db)
    parts = [EngineProcess.http_app(settings, s), EngineProcess.http_app(settings, s),
             EngineProcess.worker(settings, s), EngineProcess.worker(settings, s)]
    try:
        await db.ensure_indexes()
        hot = ["hot-0"]
        many = [f"many-{i:02d}" for i in range(50)]
        buyers = [f"buyer-{i:02d}" for i in range(20)]
        await run_all(hot + many + buyers, lambda org: runtime.accounts.register(org, utcnow()),
                      args.concurrency)
        for part in parts:
            await part.start()
        clients = [LoadClient(part.base_url,
                                headers={"Authorization": f"Bearer {TOKEN}"})
                   for part in parts[:2]]
        try:
            usage: list[Usage] = []
            loads: list[tuple[str, list[LoadClient], list[str]]] = [
                ("1 API, 1 organization", clients[:1], hot),
                ("2 APIs, 1 organization", clients, hot),
                ("1 API, 50 organizations", clients[:1], many),
                ("2 APIs, 50 organizations", clients, many),
            ]
            for label, apis, orgs in loads:
                usage.append(await usage_load(label, apis, orgs, args))
            result = await storm(clients, runtime, buyers, args)
        finally:
            for client in clients:
                await client.aclose()
        write_section("scale_out", report(usage, result, args, load_before, load_average()),
                      args.output)
        print(f"wrote {args.output}")
    finally:
        for part in parts:
            await part.stop()
        await db.client.drop_database(name)
        await db.close()


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__, seconds=8.0)
    parser.add_argument("--events", type=int, default=400)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

