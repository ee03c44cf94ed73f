"""The chaos soak's deployment and its nemesis.

Every part of the engine runs as its own process on 127.0.0.1, as deployed: SecantusDB (as
`billing dev` starts it, on a data directory), the Temporal dev server on a persistent database
file, two `billing serve` and two `billing worker`. The Stripe API fake and the webhook receiver
run in the soak's own process (they are its eyes: what Stripe was asked, what the app heard) and
serve over loopback like the others.

The nemesis kills (SIGKILL) and restarts any of them but the fake and the receiver, pauses
(SIGSTOP/SIGCONT) an API or a worker, and makes the Stripe fake answer 500 or 429 for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import ROOT
from stripe_fake import StripeFake, new_fake
from stripe_payloads import PRIMARY_SECRET
from webhook_receiver import SECRET as RECEIVER_SECRET
from webhook_receiver import Receiver

from billing.config import Settings, load_config
from starter.embedded import MongoServer, find_binary, free_port, wait_for_port
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE

TOKEN = "soak-token"
CONFIG = ROOT / "tests" / "scenarios" / "billing.toml"
READY_TIMEOUT_S = 90.0

#: Every kind of fault, in the order the report lists them.
FAULTS = ("kill-api", "kill-worker", "kill-both-workers", "pause-api", "pause-worker",
          "kill-database", "kill-temporal", "stripe-500", "stripe-429")


class Part:
    """One process of the deployment that the nemesis may kill, pause and restart."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def spawn(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *args, env=env, stdout=out, stderr=out, start_new_session=True)

    async def start(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process dies as well
            self.process.kill()
            await self.process.wait()
        self.process = None

    def pause(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.resume()
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            await self.kill()


class Database(Part):
    """SecantusDB, started as `billing dev` starts it (`starter.embedded.MongoServer`)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__("database", data_dir / "mongo.log")
        self.server = MongoServer(port=free_port(), data_dir=data_dir / "mongo",
                                  log_path=self.log)

    async def start(self) -> None:
        await self.server.start()
        self.process = self.server.process

    async def kill(self) -> None:
        await self.server.kill()
        self.process = None

    async def stop(self) -> None:
        await self.server.stop()
        self.process = None


class Temporal(Part):
    """The Temporal dev server on a database file, so a restart finds every workflow."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__("temporal", data_dir / "temporal.log")
        self.port = free_port()
        self.db_file = data_dir / "temporal.db"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        args = [find_binary("temporal"), "server", "start-dev", "--ip", "127.0.0.1",
                "--port", str(self.port), "--headless", "--db-filename", str(self.db_file),
                "--log-level", "warn"]
        for key in (ORG_ID, STRIPE_EVENT_TYPE):
            args += ["--search-attribute", f"{key.name}=Keyword"]
        await self.spawn(args)
        await wait_for_port(self.port, self.name, READY_TIMEOUT_S, self.process)


class Engine(Part):
    """`billing serve` (with a port) or `billing worker`."""

    def __init__(self, name: str, data_dir: Path, env: dict[str, str], *,
                 serve: bool) -> None:
        super().__init__(name, data_dir / f"{name}.log")
        self.env = env
        self.port = free_port() if serve else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.port is not None:
            await self.spawn([find_binary("billing"), "serve", "--port", str(self.port)],
                             self.env)
            await wait_for_port(self.port, self.name, READY_TIMEOUT_S, self.process)
        else:
            await self.spawn([find_binary("billing"), "worker", "--metrics-port", "0"],
                             self.env)


@dataclass
class Cluster:
    data_dir: Path
    database: Database = field(init=False)
    temporal: Temporal = field(init=False)
    fake: StripeFake = field(default_factory=lambda: new_fake(load_config(CONFIG)))
    receiver: Receiver = field(default_factory=lambda: Receiver(RECEIVER_SECRET))
    apis: list[Engine] = field(default_factory=list)
    workers: list[Engine] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.database = Database(self.data_dir)
        self.temporal = Temporal(self.data_dir)

    @property
    def settings(self) -> Settings:
        return Settings(
            mongodb_uri=self.database.server.uri, mongodb_db="billing_soak",
            temporal_address=self.temporal.address, temporal_task_queue="billing-soak",
            stripe_webhook_secret=PRIMARY_SECRET, stripe_api_key="sk_test_soak",
            stripe_api_base=self.fake.url, billing_api_token=TOKEN,
            billing_config=str(CONFIG), billing_webhook_url=self.receiver.url,
            billing_webhook_secret=RECEIVER_SECRET)

    def environment(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
        return {**keep, **self.settings.environment(), "BILLING_OUTBOX_POLL_SECONDS": "1"}

    @property
    def engines(self) -> list[Engine]:
        return self.apis + self.workers

    async def start(self) -> None:
        await self.fake.start()
        await self.receiver.start()
        await self.database.start()
        await self.temporal.start()
        env = self.environment()
        self.workers = [Engine(f"worker-{i}", self.data_dir, env, serve=False) for i in (1, 2)]
        self.apis = [Engine(f"api-{i}", self.data_dir, env, serve=True) for i in (1, 2)]
        for part in self.engines:
            await part.start()
        await self.ready()

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every API answers `/readyz` (MongoDB and Temporal reachable)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with httpx.AsyncClient(timeout=5) as http:
            for api in self.apis:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"{api.url}/readyz")).status_code == 200:
                            break
                    if asyncio.get_running_loop().time() > deadline:
                        raise RuntimeError(f"{api.name} is not ready: see {api.log}")
                    await asyncio.sleep(0.25)

    async def heal(self) -> None:
        """Everything running and unpaused, Stripe answering, the receiver taking every call."""
        self.fake.fail_with = None
        self.receiver.script.clear()
        for part in (self.database, self.temporal, *self.engines):
            part.resume()
            if not part.running:
                await part.start()
        await self.ready()

    async def stop(self) -> None:
        for part in (*self.engines, self.temporal, self.database):
            await part.stop()
        await self.receiver.stop()
        await self.fake.stop()


class Nemesis:
    """Injects a fault every `every_s` (a range) until told to stop; every kind once first, in an
    order drawn from the seed, then at random."""

    def __init__(self, cluster: Cluster, rng: random.Random, kinds: Sequence[str] = FAULTS,
                 every_s: tuple[float, float] = (3.0, 6.0)) -> None:
        self.cluster = cluster
        self.rng = rng
        self.kinds = tuple(kinds)
        self.every_s = every_s
        self.done: Counter[str] = Counter()

    def plan(self) -> list[str]:
        first = list(self.kinds)
        self.rng.shuffle(first)
        return first

    async def run(self, until: float) -> None:
        """Faults until `until`, and past it until every kind was injected once."""
        loop = asyncio.get_running_loop()
        queue = self.plan()
        while queue or loop.time() < until:
            await asyncio.sleep(self.rng.uniform(*self.every_s))
            fault = queue.pop(0) if queue else self.rng.choice(self.kinds)
            await self.inject(fault)
            self.done[fault] += 1

    async def inject(self, fault: str) -> None:
        c, rng = self.cluster, self.rng
        outage = rng.uniform(1.0, 3.0)
        if fault == "kill-api":
            await self._restart([rng.choice(c.apis)], outage)
        elif fault == "kill-worker":
            await self._restart([rng.choice(c.workers)], outage)
        elif fault == "kill-both-workers":
            await self._restart(c.workers, outage)
        elif fault in ("pause-api", "pause-worker"):
            part = rng.choice(c.apis if fault == "pause-api" else c.workers)
            part.pause()
            await asyncio.sleep(rng.uniform(3.0, 8.0))
            part.resume()
        elif fault == "kill-database":
            await self._restart([c.database], outage)
        elif fault == "kill-temporal":
            await self._restart([c.temporal], outage)
        elif fault in ("stripe-500", "stripe-429"):
            c.fake.fail_with = int(fault[-3:])
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            c.fake.fail_with = None
        else:
            raise ValueError(f"unknown fault {fault}")

    @staticmethod
    async def _restart(parts: Sequence[Part], outage_s: float) -> None:
        for part in parts:
            await part.kill()
        await asyncio.sleep(outage_s)
        for part in parts:
            await part.start()
