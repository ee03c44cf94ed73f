"""Helpers of the fault and storm tests: the worker and the API as their own OS processes,
SecantusDB fail points, the app on a runtime of the test's choosing, and waits that poll instead
of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pymongo import monitoring
from temporalio.client import Client, ScheduleActionStartWorkflow, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from billing.config import Settings
from billing.models import StripeEventOutcome
from billing.runtime import Runtime
from billing.store.database import Database
from starter.api.app import create_app
from starter.embedded import find_binary, free_port, terminate
from starter.schedules import SCHEDULES

T = TypeVar("T")

#: Generous: the machine's cores are shared, and a killed worker's activities only time out
#: after their 60 s start-to-close timeout.
DEADLINE_S = 240.0


async def wait_until(check: Callable[[], Awaitable[T]], what: str, *,
                     timeout_s: float = DEADLINE_S, every_s: float = 0.1) -> T:
    """Poll `check` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(every_s)


# ---- the worker as a separate process -----------------------------------------------------------


def worker_env(settings: Settings, client: Client, *, stripe_api_base: str | None = None
               ) -> dict[str, str]:
    """The environment `billing worker` reads (SPEC §4): `settings`, at the test's Temporal."""
    env = {**os.environ, **settings.environment(),
           "TEMPORAL_ADDRESS": client.service_client.config.target_host,
           "TEMPORAL_NAMESPACE": client.namespace}
    if stripe_api_base is not None:
        env["STRIPE_API_BASE"] = stripe_api_base
    return env


class WorkerProcess:
    """`billing worker` in its own OS process; its output goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                find_binary("billing"), "worker", *self.args, env=self.env, stdout=log, stderr=log,
                start_new_session=True,
            )

    async def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to Temporal, transactions left open."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            await self.kill()


async def delete_schedules_of(client: Client, task_queue: str) -> list[str]:
    """A worker process creates the engine's schedules on its queue: remove those it created."""
    deleted = []
    for definition in SCHEDULES:
        handle = client.get_schedule_handle(definition.id)
        try:
            action = (await handle.describe()).schedule.action
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                continue
            raise
        if isinstance(action, ScheduleActionStartWorkflow) and action.task_queue == task_queue:
            await handle.delete()
            deleted.append(definition.id)
    return deleted


# ---- the engine on a runtime of the test's choosing ---------------------------------------------


def runtime_on(base: Runtime, *, client_options: dict[str, Any] | None = None,
               **settings: Any) -> Runtime:
    """`base` with other settings (a task queue, a MongoDB, a Temporal address) and a MongoDB
    client of its own built with `client_options`; close its `db` after use."""
    changed = base.settings.model_copy(update=settings)
    db = Database(changed.mongodb_uri, changed.mongodb_db, **(client_options or {}))
    return Runtime(settings=changed, config=base.config, db=db)


@asynccontextmanager
async def app_client(runtime: Runtime, temporal: Client | None
                     ) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app in process with its lifespan run; `temporal=None` connects lazily to
    `TEMPORAL_ADDRESS` as the production server does."""
    app = create_app(runtime, temporal)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api",
        headers={"Authorization": "Bearer test-token"},
    ) as client:
        yield client


@asynccontextmanager
async def serving(env: dict[str, str], log: Path) -> AsyncIterator[httpx.AsyncClient]:
    """`billing serve` in its own process, ready (its `/readyz` answers 200)."""
    port = free_port()
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            find_binary("billing"), "serve", "--port", str(port), env=env, stdout=out,
            stderr=out, start_new_session=True)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     headers={"Authorization": "Bearer test-token"}) as api:
            async def ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"billing serve exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await api.get("/readyz")).status_code == 200
                return False

            await wait_until(ready, "billing serve to be ready", timeout_s=60)
            yield api
    finally:
        await terminate(process, grace_s=15)



# ---- workflows ----------------------------------------------------------------------------------


async def outcomes(client: Client, event_ids: list[str], *, timeout_s: float = DEADLINE_S
                   ) -> dict[str, StripeEventOutcome]:
    """Every `stripe-<evt id>` workflow's result; a failed one raises."""

    async def one(event_id: str) -> StripeEventOutcome:
        handle = client.get_workflow_handle(f"stripe-{event_id}", result_type=StripeEventOutcome)
        result: StripeEventOutcome = await handle.result()
        return result

    async with asyncio.timeout(timeout_s):
        found = await asyncio.gather(*(one(e) for e in event_ids))
    return dict(zip(event_ids, found, strict=True))


async def failures(client: Client, event_ids: list[str], *, timeout_s: float = DEADLINE_S
                   ) -> dict[str, WorkflowFailureError]:
    """Wait for every `stripe-<evt id>` workflow to close; the failure of each one that failed."""

    async def one(event_id: str) -> WorkflowFailureError | None:
        try:
            await client.get_workflow_handle(f"stripe-{event_id}").result()
        except WorkflowFailureError as exc:
            return exc
        return None

    async with asyncio.timeout(timeout_s):
        found = await asyncio.gather(*(one(e) for e in event_ids))
    return {e: exc for e, exc in zip(event_ids, found, strict=True) if exc is not None}


# ---- the ledger ---------------------------------------------------------------------------------


# ---- SecantusDB fail points ---------------------------------------------------------------------


@asynccontextmanager
async def fail_point(db: Database, *, app_name: str, commands: list[str], times: int,
                     error_code: int | None = None, error_labels: list[str] | None = None,
                     close_connection: bool = False, skip: int = 0) -> AsyncIterator[None]:
    """`failCommand` on the next `times` of `commands` sent by the client named `app_name` only,
    after letting `skip` of them pass; `db` is a client of the test (it must not carry that
    name)."""
    data: dict[str, Any] = {"failCommands": commands, "appName": app_name}
    if error_code is not None:
        data["errorCode"] = error_code
    if error_labels is not None:
        data["errorLabels"] = error_labels
    if close_connection:
        data["closeConnection"] = True
    mode = {"skip": skip, "times": times} if skip else {"times": times}
    await db.client.admin.command({"configureFailPoint": "failCommand",
                                   "mode": mode, "data": data})
    try:
        yield
    finally:
        await db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


class FailedCommands(monitoring.CommandListener):
    """Counts the commands a client saw fail, by command name (register it on that client)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.counts[event.command_name] += 1
