"""Chaos soak: the engine's processes under a mixed workload while a nemesis kills them, then
every organization checked against a model of what should have happened.

    python bench/soak.py [--seed 1] [--seconds 60] [--orgs 10] [--lanes 6] [--output FILE]

1. Starts the deployment (`soak_cluster.py`): SecantusDB, Temporal on a database file, two
   `billing serve`, two `billing worker`, the Stripe fake and a webhook receiver that answers
   500 to one delivery in five, all on 127.0.0.1.
2. For `--seconds`, drives the workload (`soak_workload.py`): Stripe scenarios played shuffled
   and duplicated across both APIs (`--lanes` at a time, a new one as each ends), and usage
   organizations (`--orgs`) sending records, batches, purchases (some started by the engine's
   Checkout), runs reserved with balance holds and admin credits, with automatic top-ups.
   Meanwhile the nemesis injects a fault every 3-6 s, every kind at least once.
3. Heals everything, waits until no workflow runs and every notification reached the receiver,
   and checks the invariants (`soak_check.py`) and `billing reconcile --now`.

It prints what it did and every violation with its organization and the seed, and exits 1 on
any violation. The seed fixes the workload's plan and the faults' order and kinds; the timing
between processes is the machine's. `--output RELIABILITY.md` records the run there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, write_section
from soak_check import Violation, check_all
from soak_cluster import CONFIG, FAULTS, Cluster, Nemesis
from soak_workload import Api, ScenarioDeck, ScenarioPlay, UsageOrg, clients, usage_orgs
from temporalio.client import Client
from temporalio.service import RPCError

from billing.config import load_config
from billing.runtime import Runtime
from billing.store.database import Database
from starter import event_loop
from starter.temporal_client import connect

#: How long the heal may take: the last faults' retries, timers and deliveries to finish.
SETTLE_S = 300.0
#: One delivery in this many is answered 500 by the receiver while faults are injected.
RECEIVER_FAILS_ONE_IN = 5


@dataclass
class Outcome:
    seed: int
    seconds: float
    faults: Counter[str]
    plays: list[ScenarioPlay]
    orgs: list[UsageOrg]
    retries: int
    topups: int = 0
    violations: list[Violation] = field(default_factory=list)
    took_s: float = 0.0

    def figures(self) -> dict[str, int]:
        events = sum(len(set(p.delivered)) for p in self.plays) + sum(o.events for o in self.orgs)
        deliveries = sum(len(p.delivered) for p in self.plays) + sum(
            o.deliveries for o in self.orgs)
        return {"stripe events": events, "deliveries": deliveries,
                "usage records": sum(o.records for o in self.orgs),
                "batches": sum(o.batches for o in self.orgs),
                "packs bought": sum(o.packs for o in self.orgs),
                "checkouts the engine started": sum(o.checkouts for o in self.orgs),
                "holds granted": sum(o.holds for o in self.orgs),
                "holds released": sum(o.released for o in self.orgs),
                "holds refused": sum(o.refused for o in self.orgs),
                "admin credits": sum(o.credits for o in self.orgs),
                "automatic top-ups": self.topups,
                "scenario plays": len(self.plays),
                "organizations": len(self.plays) + len(self.orgs),
                "client retries": self.retries, "faults": sum(self.faults.values())}

    def summary(self) -> str:
        f = self.figures()
        kinds = ", ".join(f"{kind} {n}" for kind in FAULTS if (n := self.faults[kind]))
        return (f"{f['stripe events']} events ({f['deliveries']} deliveries), "
                f"{f['usage records']} records ({f['batches']} batches), "
                f"{f['faults']} faults ({kinds}), {len(self.violations)} violations")


async def wait_quiet(client: Client, task_queue: str, db: Database, cluster: Cluster,
                     deadline: float) -> None:
    """Until no workflow of the engine runs and the receiver heard every notification."""
    loop = asyncio.get_running_loop()
    query = f'TaskQueue="{task_queue}" AND ExecutionStatus="Running"'
    while True:
        try:
            running = (await client.count_workflows(query)).count
        except RPCError:
            running = -1
        heard = {(r.body["org_id"], r.body["seq"]) for r in cluster.receiver.received}
        unheard = [n async for n in db.notifications.find({}, {"org_id": 1, "seq": 1})
                   if (n["org_id"], n.get("seq")) not in heard]
        if running == 0 and not unheard:
            return
        if loop.time() > deadline:
            print(f"still not quiet: {running} workflows running, {len(unheard)} notifications "
                  "not delivered", flush=True)
            return
        await asyncio.sleep(1.0)


async def soak(args: argparse.Namespace, data_dir: Path) -> Outcome:
    rng = random.Random(args.seed)
    cluster = Cluster(data_dir)
    cluster.receiver.script = [500 if rng.randrange(RECEIVER_FAILS_ONE_IN) == 0 else 200
                               for _ in range(5000)]
    started = time.monotonic()
    settings = cluster.settings
    db = Database(settings.mongodb_uri, settings.mongodb_db, serverSelectionTimeoutMS=3000)
    runtime = Runtime(settings=settings, config=load_config(CONFIG), db=db)
    loop = asyncio.get_running_loop()
    until = loop.time() + args.seconds
    #: Faults may go on past `until` (every kind once); the deadline is for what retries.
    deadline = until + len(FAULTS) * 15 + SETTLE_S
    stop = asyncio.Event()  # set when the faults end: the workload goes on as long as they do
    plays: list[ScenarioPlay] = []
    orgs = usage_orgs(rng, args.orgs, actions=args.actions)
    nemesis = Nemesis(cluster, random.Random(rng.random()), args.faults)
    try:
        await cluster.start()
        client = await connect(settings)
        async with clients([api.url for api in cluster.apis], settings.billing_api_token) as http:
            api = Api(http, random.Random(rng.random()), deadline)
            deck = ScenarioDeck(random.Random(rng.random()))

            async def lane() -> None:
                while not stop.is_set():
                    play = deck.play(api=http[0], client=client, fake=cluster.fake,
                                     runtime=runtime, soak_api=api)
                    plays.append(play)
                    await play.deliver_shuffled(deck.rng.randrange(2**32))

            work = [asyncio.create_task(lane()) for _ in range(args.lanes)]
            work += [asyncio.create_task(org.run(api, cluster.fake, client, stop,
                                                 settings.temporal_task_queue))
                     for org in orgs]
            faults_from = loop.time()
            await nemesis.run(until)
            stop.set()
            fault_seconds = loop.time() - faults_from
            print(f"faults done ({sum(nemesis.done.values())}); healing", flush=True)
            await cluster.heal()
            results = await asyncio.gather(*work, return_exceptions=True)
            outcome = Outcome(args.seed, fault_seconds, nemesis.done, plays, orgs, api.retries)
            outcome.topups = sum(len(cluster.fake.intents_of(o.customer))
                                 for o in orgs if o.customer)
            for result in results:
                if isinstance(result, BaseException):
                    outcome.violations.append(Violation(
                        "-", f"the workload stopped: {result!r}"))
            await wait_quiet(client, settings.temporal_task_queue, db, cluster, deadline)
            outcome.violations += await check_all(plays, orgs, cluster, client, db)
    finally:
        await db.close()
        await cluster.stop()
    outcome.took_s = time.monotonic() - started
    return outcome


def report(outcome: Outcome) -> str:
    lines = [f"seed {outcome.seed}: {outcome.seconds:.0f} s of faults, "
             f"{outcome.took_s:.0f} s in all", outcome.summary()]
    lines += [f"  {k}: {v}" for k, v in outcome.figures().items()]
    lines += [f"VIOLATION (seed {outcome.seed}) {v}" for v in outcome.violations]
    return "\n".join(lines)


def record(outcome: Outcome, path: Path, command: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip() or "unknown"
    write_section(f"soak-seed-{outcome.seed}", "\n".join([
        f"### Seed {outcome.seed}", "",
        f"`{command}` (commit {commit}, {time.strftime('%Y-%m-%d', time.gmtime())})", "",
        f"{outcome.summary()} ({outcome.took_s / 60:.1f} minutes in all, "
        f"{outcome.figures()['organizations']} organizations, "
        f"{outcome.retries} client retries)."]), path)


def replayable(argv: list[str]) -> list[str]:
    """The arguments that decide a run, without where it writes (`--output`, `--data-dir`)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--output", "--data-dir"):
            skip = True
        elif not arg.startswith(("--output=", "--data-dir=")):
            kept.append(arg)
    return kept


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long faults go on")
    parser.add_argument("--orgs", type=int, default=10, help="usage organizations")
    parser.add_argument("--actions", type=int, default=400,
                        help="at most this many actions per usage organization")
    parser.add_argument("--lanes", type=int, default=6,
                        help="scenario plays at a time")
    parser.add_argument("--faults", type=lambda text: text.split(","), default=list(FAULTS),
                        help=f"the kinds to inject, comma-separated (default all: "
                             f"{','.join(FAULTS)})")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the servers' data and logs here (default: a temporary dir)")
    parser.add_argument("--output", type=Path, default=None,
                        help="record the run in this file (RELIABILITY.md)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON last")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        sys.exit(f"unknown fault kinds {sorted(unknown)}; the kinds are {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="billing-soak-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        outcome = event_loop.run(soak(args, data_dir))
    print(report(outcome), flush=True)
    if args.output is not None:
        record(outcome, args.output, "python bench/soak.py " + " ".join(replayable(sys.argv[1:])))
    if args.json:
        print(json.dumps({**outcome.figures(), "faults_by_kind": dict(outcome.faults),
                          "fault_kinds": list(FAULTS),
                          "violations": [str(v) for v in outcome.violations]}))
    sys.exit(1 if outcome.violations else 0)


if __name__ == "__main__":
    main()
