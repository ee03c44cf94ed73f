"""The `billing` application: one command group per module of this package, registered here.

Commands import the engine (pymongo, temporalio, FastAPI) only when they run, so `billing
--help` stays fast.
"""

from __future__ import annotations

import atexit
import os
import sys

import typer

from starter.cli import (
    adjustments,
    auto_topup,
    events,
    orgs,
    processes,
    purchases,
    reconcile,
    schedules,
    webhooks,
)

app = typer.Typer(
    name="billing",
    help="Billing engine: weekly plan quotas, prepaid credit packs and Stripe events on Temporal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold tokens and secrets
)

for group in (processes, orgs, adjustments, auto_topup, purchases, events, schedules,
              reconcile, webhooks):
    group.register(app)


def main() -> None:
    """The console script: run the command, then leave without the interpreter's teardown.

    The Temporal client's Rust threads can outlive a short command's event loop, and CPython's
    finalization then aborts the process (`Fatal Python error: PyGILState_Release`, SIGABRT;
    temporalio/sdk-python#300): a command that did its work would report a crash (seen on
    `billing reconcile --now` in the chaos soak). The exit handlers still run (logging, the
    tracing exporter's flush) and output is flushed first; the exit code is the command's own."""
    code = 1
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        sys.excepthook(*sys.exc_info())  # typer's own report of an unexpected error
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
