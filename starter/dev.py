"""`billing dev`: the whole engine in one process tree, for development.

SecantusDB, the Temporal dev server (with its Web UI) and the worker run as child processes (the
worker apart so that it and the API each use a core); the HTTP API runs in this process's event
loop. Everything is kept under the data directory
(MongoDB storage, the Temporal database file, the generated dev token and webhook secret), so a
restart finds the same organizations, ledgers and workflow history.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from billing.config import BillingConfig, Settings, load_config
from billing.runtime import Runtime
from starter import tracing
from starter.api.app import create_app
from starter.embedded import (
    EmbeddedError,
    MongoServer,
    WorkerProcess,
    ensure_port_free,
    free_port,
    start_temporal,
)
from starter.stripe_fake import API_KEY, StripeFake, Webhook
from starter.worker_process import prepare

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
CREDENTIALS_FILE = "dev-credentials.json"


@dataclass(frozen=True)
class DevOptions:
    data_dir: Path
    http_port: int = 8000
    temporal_port: int = 7233
    ui_port: int = 8233
    mongo_port: int = 27017

    def ports(self) -> tuple[tuple[str, int, str], ...]:
        """(option, port, what listens there) for every port the stack binds."""
        return (
            ("--http-port", self.http_port, "the HTTP API"),
            ("--temporal-port", self.temporal_port, "Temporal"),
            ("--ui-port", self.ui_port, "the Temporal Web UI"),
            ("--mongo-port", self.mongo_port, "MongoDB"),
        )


def _port_taken(option: str, port: int, what: str) -> EmbeddedError:
    return EmbeddedError(
        f"port {port} ({what}) is already in use: stop what listens there "
        f"or choose another port with {option}"
    )


def check_ports(options: DevOptions) -> None:
    """Fail before starting anything when a port is taken or given twice."""
    seen: dict[int, str] = {}
    for option, port, what in options.ports():
        if port in seen:
            raise EmbeddedError(f"{option} and {seen[port]} are both {port}: use distinct ports")
        seen[port] = option
        try:
            ensure_port_free(port, what)
        except EmbeddedError as exc:
            raise _port_taken(option, port, what) from exc


def _bind_http(options: DevOptions) -> socket.socket:
    """Bind the API port now, so it cannot be taken while the rest starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, options.http_port))
    except OSError as exc:
        sock.close()
        raise _port_taken("--http-port", options.http_port, "the HTTP API") from exc
    sock.listen(128)
    return sock


@dataclass(frozen=True)
class DevCredentials:
    api_token: str
    webhook_secret: str
    portal_secret: str


def dev_credentials(data_dir: Path) -> DevCredentials:
    """The dev API token, webhook secret and customer-token key: generated on the first start,
    then read back from the data directory so API clients, `billing send-test-event` and the
    customer page links keep working across restarts."""
    path = data_dir / CREDENTIALS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise EmbeddedError(
                f"{path} is unreadable ({exc}): delete it to generate new values"
            ) from exc
    wanted = {
        "api_token": stored.get("api_token") or f"dev_{secrets.token_urlsafe(24)}",
        "webhook_secret": stored.get("webhook_secret") or f"whsec_dev_{secrets.token_hex(16)}",
        "portal_secret": stored.get("portal_secret") or f"portal_dev_{secrets.token_urlsafe(32)}",
    }
    if wanted != stored:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(wanted, out, indent=2)
    return DevCredentials(**wanted)


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret, `whsec_<base64 of 24 random bytes>`."""
    return f"whsec_{base64.b64encode(secrets.token_bytes(24)).decode()}"


def dev_settings(options: DevOptions, credentials: DevCredentials) -> Settings:
    """The environment's settings, pointed at the embedded servers; `BILLING_API_TOKEN`,
    `STRIPE_WEBHOOK_SECRET`, `BILLING_PORTAL_SECRET` and `BILLING_PUBLIC_URL` win over the
    generated dev values when they are set."""
    env = Settings()
    return Settings(
        mongodb_uri=MongoServer(port=options.mongo_port).uri,
        temporal_address=f"{HOST}:{options.temporal_port}",
        billing_api_token=env.billing_api_token or credentials.api_token,
        stripe_webhook_secret=env.stripe_webhook_secret or credentials.webhook_secret,
        billing_portal_secret=env.billing_portal_secret or credentials.portal_secret,
        billing_public_url=os.environ.get("BILLING_PUBLIC_URL")
        or f"http://{HOST}:{options.http_port}",
    )


def stripe_stand_in(config: BillingConfig, data_dir: Path, settings: Settings,
                    options: DevOptions) -> StripeFake:
    """The Stripe API stand-in `billing dev` runs without `STRIPE_API_KEY`: it sells the
    configured packs and plans, keeps its objects in the data directory, and delivers the events
    of a Checkout paid on its page to this stack's webhook, signed as Stripe signs them."""
    fake = StripeFake(free_port(), state_file=data_dir / "stripe-stand-in.json")
    fake.sell(config)
    fake.webhook = Webhook(url=f"http://{HOST}:{options.http_port}/stripe/webhook",
                           secret=settings.webhook_secrets[0])
    return fake


def _temporal_database(data_dir: Path) -> Path:
    """The Temporal dev server creates its schema only in a new database file, so a first start
    interrupted midway leaves a file it then refuses. A file without the marker written after a
    completed start holds no history: remove it and start afresh."""
    database = data_dir / "temporal.db"
    if database.exists() and not _temporal_marker(database).exists():
        for leftover in data_dir.glob(f"{database.name}*"):
            leftover.unlink()
    return database


def _temporal_marker(database: Path) -> Path:
    return database.with_name(f"{database.name}.started")


class _EmbeddedHTTPServer(uvicorn.Server):
    """uvicorn without its own signal handlers: `billing dev` owns SIGINT and SIGTERM and stops
    the server itself, in order with the other parts."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _stop_task(task: asyncio.Task[None]) -> None:
    """Wait for a part's task to end; its failure, if any, was already reported."""
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


async def _wait_polling(client: Client, task_queue: str, worker: asyncio.Task[None]) -> None:
    """Wait until a worker polls the task queue, so an event sent once `billing dev` says it is
    ready is picked up at once."""
    request = DescribeTaskQueueRequest(namespace=client.namespace,
                                       task_queue=TaskQueue(name=task_queue))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (await client.workflow_service.describe_task_queue(request)).pollers:
        if worker.done():
            raise _failure("the worker", worker)
        if time.monotonic() > deadline:
            raise EmbeddedError(f"no worker polls {task_queue} after {READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.2)


async def _stop_server(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await _stop_task(task)


def _failure(name: str, task: asyncio.Task[None]) -> EmbeddedError:
    error = None if task.cancelled() else task.exception()
    return EmbeddedError(f"{name} stopped unexpectedly" + (f": {error!r}" if error else ""))


async def _wait_ready(api: str, ui: str, parts: dict[str, asyncio.Task[None]]) -> None:
    """Poll `/readyz` (MongoDB and Temporal answer the app) and the Web UI until both answer."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = {f"{api}/readyz": "the HTTP API", ui: "the Temporal Web UI"}
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            for name, task in parts.items():
                if task.done():
                    raise _failure(name, task)
            for url in list(pending):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url)).status_code < 300:
                        del pending[url]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"{', '.join(pending.values())} not ready within {READY_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.2)


async def _until_a_part_stops(mongo: MongoServer, parts: dict[str, asyncio.Task[None]]) -> None:
    """Run until cancelled; a part that stops on its own ends the stack with an error."""
    assert mongo.process is not None
    mongo_exit = asyncio.create_task(mongo.process.wait())
    try:
        done, _ = await asyncio.wait(
            {mongo_exit, *parts.values()}, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        mongo_exit.cancel()
    if mongo_exit in done:
        raise EmbeddedError(f"MongoDB (SecantusDB) exited with code {mongo_exit.result()}")
    name, task = next((n, t) for n, t in parts.items() if t in done)
    raise _failure(name, task)


def _print_ready(
    console: Console, options: DevOptions, settings: Settings, data_dir: Path, worker: WorkerProcess
) -> None:
    api = f"http://{HOST}:{options.http_port}"
    token = settings.api_tokens[0]
    rows = [
        ("HTTP API", api),
        ("API docs", f"{api}/docs"),
        ("Temporal Web UI", f"http://{HOST}:{options.ui_port}"),
        ("Temporal", f"{settings.temporal_address} (namespace {settings.temporal_namespace}, "
                     f"task queue {settings.temporal_task_queue})"),
        ("MongoDB", f"{settings.mongodb_uri} (database {settings.mongodb_db})"),
        ("Worker metrics", f"http://{HOST}:{worker.metrics_port}/metrics"),
        ("Data", str(data_dir)),
        ("API token", token),
        ("Webhook secret", settings.webhook_secrets[0]),
        ("Stripe API", (settings.stripe_api_base or "https://api.stripe.com")
         if settings.stripe_api_key else "not configured (STRIPE_API_KEY)"),
    ]
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # never cut a token or a secret short
    for label, value in rows:
        table.add_row(f"[bold]{label}[/bold]", escape(value))
    console.print("[bold green]billing dev is ready[/bold green]")
    console.print(table)
    console.print(
        f'Try: curl -X PUT -H "Authorization: Bearer {escape(token)}" {api}/v1/orgs/acme',
        soft_wrap=True,
    )
    console.print(
        "Other terminals (billing balance, credit, token, ...): "
        f"export MONGODB_URI='{settings.mongodb_uri}' TEMPORAL_ADDRESS={settings.temporal_address}"
        f" BILLING_PORTAL_SECRET='{escape(settings.billing_portal_secret)}'"
        f" BILLING_PUBLIC_URL={settings.billing_public_url}",
        soft_wrap=True,
    )
    mint = (f'curl -X POST -H "Authorization: Bearer {token}" -H "Content-Type: '
            f"application/json\" -d '{{\"scopes\": [\"read\", \"purchase\"]}}' "
            f"{api}/v1/orgs/acme/tokens")
    console.print(
        "Customer page of acme (registered by the curl above): open the portal_url that "
        f"{escape(mint)} answers (or run: billing token acme --purchase)", soft_wrap=True)
    if settings.webhook_receivers:
        console.print(f"Notifications are delivered to {escape(settings.billing_webhook_url)}; "
                      "check a receiver with: billing webhooks test", soft_wrap=True)
    else:
        console.print(
            "Outbound webhooks are off. To deliver notifications to a local receiver, start "
            f"with: BILLING_WEBHOOK_URL=http://{HOST}:9000/hooks "
            f"BILLING_WEBHOOK_SECRET={new_webhook_secret()} billing dev", soft_wrap=True)
    console.print("Press Ctrl-C to stop.")


async def _start_temporal(stack: contextlib.AsyncExitStack, options: DevOptions, data_dir: Path,
                          settings: Settings) -> None:
    """The Temporal dev server on its database file in the data directory, stopped with the
    stack."""
    database = _temporal_database(data_dir)
    try:
        temporal = await start_temporal(
            port=options.temporal_port,
            ui_port=options.ui_port,
            database_file=database,
            namespace=settings.temporal_namespace,
        )
    except RuntimeError as exc:
        raise EmbeddedError(f"Temporal did not start (its output is above): {exc}") from exc
    stack.push_async_callback(temporal.shutdown)
    _temporal_marker(database).touch()


async def run_dev(options: DevOptions, console: Console) -> None:
    """Start every part, wait until each is ready, print where they are, then run until
    cancelled (the CLI cancels on SIGINT / SIGTERM); on the way out every part is stopped, last
    started first."""
    config = load_config(Settings().billing_config)
    check_ports(options)
    tracing.setup_tracing("billing-dev")
    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = dev_settings(options, dev_credentials(data_dir))
    settings.check_webhooks()
    settings.check_portal()
    mongo = MongoServer(
        port=options.mongo_port, data_dir=data_dir / "mongo", log_path=data_dir / "mongo.log"
    )
    async with contextlib.AsyncExitStack() as stack:
        http_socket = stack.enter_context(_bind_http(options))
        console.print(f"starting MongoDB (SecantusDB) on port {options.mongo_port} ...")
        stack.push_async_callback(mongo.stop)
        await mongo.start()
        console.print(f"starting Temporal on port {options.temporal_port} ...")
        await _start_temporal(stack, options, data_dir, settings)
        if not settings.stripe_api_key and not settings.stripe_api_base:
            fake = stripe_stand_in(config, data_dir, settings, options)
            console.print(f"starting the Stripe stand-in (no STRIPE_API_KEY) on port {fake.port}"
                          " ...")
            stack.push_async_callback(fake.stop)
            await fake.start()
            settings = settings.model_copy(update={"stripe_api_key": API_KEY,
                                                   "stripe_api_base": fake.url})

        runtime = Runtime.from_settings(settings, config)
        stack.push_async_callback(runtime.db.close)
        client = await prepare(runtime)

        console.print("starting the worker and the HTTP API ...")
        worker = WorkerProcess(settings, metrics_port=free_port())
        stack.push_async_callback(worker.stop)
        await worker.start()
        worker_task = asyncio.create_task(worker.exited(), name="worker")
        stack.callback(worker_task.cancel)  # first, so that stopping the worker is no failure
        await _wait_polling(client, settings.temporal_task_queue, worker_task)
        server = _EmbeddedHTTPServer(
            uvicorn.Config(
                create_app(runtime, client), log_level="warning", timeout_graceful_shutdown=5
            )
        )
        server_task = asyncio.create_task(server.serve(sockets=[http_socket]), name="HTTP API")
        stack.push_async_callback(_stop_server, server, server_task)

        parts = {"the worker": worker_task, "the HTTP API": server_task}
        await _wait_ready(
            f"http://{HOST}:{options.http_port}", f"http://{HOST}:{options.ui_port}", parts
        )
        _print_ready(console, options, settings, data_dir, worker)
        await _until_a_part_stops(mongo, parts)
