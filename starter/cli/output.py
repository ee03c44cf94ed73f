"""What every command shares: the consoles, exit codes, how errors become one line on stderr,
progress bars, and the runtime and Temporal client a command uses."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

from starter import event_loop

if TYPE_CHECKING:
    from rich.table import Table
    from temporalio.client import Client

    from billing.runtime import Runtime
    from starter.operations.progress import OnProgress

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


@contextlib.contextmanager
def operator_errors() -> Iterator[None]:
    """`reported_errors` plus what Temporal answers: one line on stderr and exit 1."""
    from temporalio.service import RPCError

    with reported_errors():
        try:
            yield
        except RPCError as exc:
            err_console.print(f"[red]Temporal refused:[/red] {escape(exc.message)}")
            raise typer.Exit(EXIT_ERROR) from exc


def print_table(table: Table, out: Console | None = None) -> None:
    """Print `table` at its natural width, never narrower than the terminal: every id stays
    whole on one line whatever the terminal's width (SPEC §7: an operator copies them), and a
    terminal narrower than the table wraps its lines itself."""
    from rich.measure import Measurement

    out = out or console
    natural = Measurement.get(out, out.options.update_width(1_000_000), table).maximum
    width = out.width
    out.width = max(width, natural)
    try:
        out.print(table, crop=False)
    finally:
        out.width = width


@contextlib.contextmanager
def progress_bars(*descriptions: str) -> Iterator[list[OnProgress]]:
    """One rich progress bar per step on stderr (stdout stays clean for `--json`); each
    callback takes `(done, total)` and shows its bar from its first report."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bars:
        tasks = [bars.add_task(d, total=None, visible=False) for d in descriptions]

        def updater(task: TaskID) -> OnProgress:
            def update(done: int, total: int | None) -> None:
                bars.update(task, completed=done, total=total, visible=True)
            return update

        yield [updater(task) for task in tasks]


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

    event_loop.run(supervise())


def dev_value(data_dir: Path, name: str, configured: tuple[str, ...], variable: str) -> str:
    """A setting's first configured value, else the one `billing dev` generated and keeps in its
    data directory (exits 2 saying what to set when there is neither)."""
    import json

    from starter.dev import CREDENTIALS_FILE

    if configured:
        return configured[0]
    path = data_dir / CREDENTIALS_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))[name])
    except (OSError, ValueError, KeyError) as exc:
        err_console.print(f"no {variable} and no readable {path}: set {variable} or start "
                          "[bold]billing dev[/bold] first")
        raise typer.Exit(EXIT_CONFIG) from exc


def store_runtime() -> Runtime:
    """Settings from the environment and the configuration file (`Runtime.from_settings`)."""
    from billing.config import Settings
    from billing.runtime import Runtime

    return Runtime.from_settings(Settings())


def check_durable(runtime: Runtime) -> None:
    """`billing serve`'s start-up check that MongoDB can keep acknowledged writes (the worker
    makes it in `prepare`), on a client of its own: the runtime's belongs to the server's loop."""
    from billing.runtime import Runtime

    async def check() -> None:
        db = Runtime.from_settings(runtime.settings, runtime.config).db
        try:
            await db.check_durable()
        finally:
            await db.close()

    event_loop.run(check())


async def temporal() -> Client:
    """The Temporal client of `TEMPORAL_ADDRESS`; unreachable is a `TemporalUnavailable`."""
    from billing.config import Settings
    from starter.temporal_client import connect

    return await connect(Settings())
