"""The `billing` command line (SPEC §7).

Commands import the engine (pymongo, temporalio, FastAPI) only when they run, so `billing
--help` stays fast. Other modules add their command groups through `register(app)` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from starter import cli_admin, cli_events, cli_reconcile, cli_schedules, cli_webhooks

if TYPE_CHECKING:
    from billing.runtime import Runtime

app = typer.Typer(
    name="billing",
    help="Billing engine: weekly plan quotas, prepaid credit packs and Stripe events on Temporal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold tokens and secrets
)
console = Console()
err_console = Console(stderr=True)

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Errors an operator can act on become one line on stderr and an exit code, not a traceback:
    invalid configuration exits 2, a domain error (unknown organization, bad id), an embedded
    server that cannot start or an unreachable MongoDB exit 1."""
    from pymongo.errors import ConnectionFailure

    from billing.config import ConfigError
    from billing.errors import BillingError
    from starter.embedded import EmbeddedError

    try:
        yield
    except ConfigError as exc:
        err_console.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_CONFIG) from exc
    except BillingError as exc:
        err_console.print(f"[red]{exc.code}:[/red] {escape(exc.message)}")
        raise typer.Exit(EXIT_ERROR) from exc
    except EmbeddedError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_ERROR) from exc
    except ConnectionFailure as exc:
        err_console.print(f"[red]cannot reach MongoDB:[/red] {escape(str(exc).split(',')[0])}")
        raise typer.Exit(EXIT_ERROR) from exc


def run_until_signal(main: Coroutine[Any, Any, None]) -> None:
    """Run `main`; the first SIGINT or SIGTERM cancels it so it can stop what it started (later
    signals are ignored while it does). Ending on a signal is a normal exit."""

    async def supervise() -> None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        signalled = False

        def on_signal() -> None:
            nonlocal signalled
            if not signalled:
                signalled = True
                err_console.print("stopping ...")
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await task
        except asyncio.CancelledError:
            if not signalled:
                raise
            err_console.print("stopped")

    asyncio.run(supervise())


def _store_runtime() -> Runtime:
    """Settings from the environment and the configuration file (`Runtime.from_settings`)."""
    from billing.config import Settings
    from billing.runtime import Runtime

    return Runtime.from_settings(Settings())


@app.command()
def dev(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="where MongoDB, Temporal and dev secrets keep data")
    ] = Path(".billing-dev"),
    http_port: Annotated[int, typer.Option("--http-port", min=1, max=65535)] = 8000,
    temporal_port: Annotated[int, typer.Option("--temporal-port", min=1, max=65535)] = 7233,
    ui_port: Annotated[int, typer.Option("--ui-port", min=1, max=65535)] = 8233,
    mongo_port: Annotated[int, typer.Option("--mongo-port", min=1, max=65535)] = 27017,
) -> None:
    """Run the whole engine locally, in one process tree.

    MongoDB (SecantusDB), Temporal with its Web UI, the worker and the HTTP API. Ctrl-C stops
    everything; the data stays in --data-dir for the next start."""
    with reported_errors():
        from billing.logs import configure_logging
        from starter.dev import DevOptions, run_dev
        from starter.telemetry import enable_sdk_metrics

        configure_logging(json=False)
        enable_sdk_metrics()

        options = DevOptions(
            data_dir=data_dir, http_port=http_port, temporal_port=temporal_port,
            ui_port=ui_port, mongo_port=mongo_port,
        )
        run_until_signal(run_dev(options, console))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
) -> None:
    """Run the HTTP API (webhook receiver, /v1, health) with settings from the environment."""
    with reported_errors():
        import uvicorn

        from billing.logs import configure_logging
        from starter.api.app import create_app
        from starter.telemetry import enable_sdk_metrics

        configure_logging()
        enable_sdk_metrics()
        runtime = _store_runtime()
        if not runtime.settings.api_tokens:
            err_console.print("[red]configuration error:[/red] BILLING_API_TOKEN is not set: "
                              "every /v1 request would be refused")
            raise typer.Exit(EXIT_CONFIG)
        if not runtime.settings.webhook_secrets:
            err_console.print("[yellow]warning:[/yellow] STRIPE_WEBHOOK_SECRET is not set: "
                              "POST /stripe/webhook rejects every event")
        uvicorn.run(create_app(runtime), host=host, port=port, proxy_headers=True)


@app.command()
def worker(
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=0, max=65535, help="Prometheus port, 0: none")
    ] = 9464,
) -> None:
    """Run the Temporal worker (creates the indexes and schedules it needs first)."""
    with reported_errors():
        from billing.logs import configure_logging
        from starter.telemetry import enable_sdk_metrics, serve_metrics
        from worker import run_worker

        configure_logging()
        enable_sdk_metrics()
        if metrics_port:
            serve_metrics(metrics_port)
        run_until_signal(run_worker(_store_runtime()))


@app.command()
def balance(
    org: Annotated[str, typer.Argument(help="organization id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """An organization's extras balance and its open lots (in the order debits take them)."""
    from starter.api import orgs

    async def read() -> orgs.Balance:
        runtime = _store_runtime()
        try:
            return await orgs.balance(org, runtime)
        finally:
            await runtime.db.close()

    with reported_errors():
        result = asyncio.run(read())
    if as_json:
        typer.echo(result.model_dump_json())
        return
    console.print(
        f"[bold]{escape(result.org_id)}[/bold]: balance [bold]{result.balance}[/bold] units"
    )
    table = Table()
    table.add_column("lot", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("units", justify="right", no_wrap=True)
    table.add_column("remaining", justify="right", no_wrap=True)
    table.add_column("expires at (UTC)", no_wrap=True)
    for lot in result.lots:
        table.add_row(
            lot.id, lot.kind, str(lot.units), str(lot.remaining),
            f"{lot.expires_at:%Y-%m-%d %H:%M:%S}" if lot.expires_at else "never",
        )
    if result.lots:
        console.print(table)
    else:
        console.print("no open lots")


@app.command()
def ledger(
    org: Annotated[str, typer.Argument(help="organization id")],
    limit: Annotated[int, typer.Option(min=1, max=200, help="entries to show")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """An organization's ledger entries, newest first."""
    from starter.api import orgs

    async def read() -> orgs.LedgerPage:
        runtime = _store_runtime()
        try:
            return await orgs.ledger(org, runtime, limit=limit, cursor=None)
        finally:
            await runtime.db.close()

    with reported_errors():
        page = asyncio.run(read())
    if as_json:
        typer.echo(page.model_dump_json())
        return
    table = Table(title=f"ledger of {escape(org)}, newest first")
    table.add_column("created at (UTC)", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("key", overflow="fold")
    table.add_column("lot", overflow="fold")
    table.add_column("memo")
    for entry in page.entries:
        table.add_row(
            f"{entry.created_at:%Y-%m-%d %H:%M:%S}", entry.kind, f"{entry.amount:+d}",
            escape(entry.key), entry.lot_id or "", escape(entry.memo),
        )
    console.print(table)
    if page.next_cursor:
        console.print("more entries: raise --limit (at most 200) or page "
                      f"GET /v1/orgs/{escape(org)}/ledger?cursor={page.next_cursor}")


@app.command()
def meter(
    org: Annotated[str, typer.Argument(help="organization id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """This ISO week's meter of an organization: used, quota, plan and what remains."""
    from billing.store.meters import Meters
    from starter.api import metering

    async def read() -> metering.MeterResponse:
        runtime = _store_runtime()
        try:
            return await metering.meter(org, Meters(runtime.db, runtime.config))
        finally:
            await runtime.db.close()

    with reported_errors():
        view = asyncio.run(read())
    if as_json:
        typer.echo(view.model_dump_json())
        return
    table = Table(title=f"meter of {escape(view.org_id)}, week {view.week}")
    for column in ("plan", "used", "quota", "remaining"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    table.add_row(view.plan_id, str(view.used), str(view.quota), str(view.remaining))
    console.print(table)


cli_admin.register(app)
cli_events.register(app)
cli_schedules.register(app)
cli_reconcile.register(app)
cli_webhooks.register(app)
