"""The engine's processes: `billing dev`, `billing serve`, `billing worker`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from starter.cli.output import (
    EXIT_CONFIG,
    check_durable,
    console,
    err_console,
    reported_errors,
    run_until_signal,
    store_runtime,
)


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
        runtime = store_runtime()
        check_durable(runtime)
        if not runtime.settings.api_tokens:
            err_console.print("[red]configuration error:[/red] BILLING_API_TOKEN is not set: "
                              "every /v1 request would be refused")
            raise typer.Exit(EXIT_CONFIG)
        runtime.settings.check_portal()
        if not runtime.settings.portal_secrets:
            err_console.print("[yellow]warning:[/yellow] BILLING_PORTAL_SECRET is not set: no "
                              "customer token can be issued, so GET /portal shows no data")
        if not runtime.settings.webhook_secrets:
            err_console.print("[yellow]warning:[/yellow] STRIPE_WEBHOOK_SECRET is not set: "
                              "POST /stripe/webhook rejects every event")
        uvicorn.run(create_app(runtime), host=host, port=port, proxy_headers=True)


def worker(
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=0, max=65535, help="Prometheus port, 0: none")
    ] = 9464,
    log_format: Annotated[
        str, typer.Option("--log-format", help="json (one line per record) or text")
    ] = "json",
) -> None:
    """Run the Temporal worker (creates the indexes and schedules it needs first)."""
    if log_format not in ("json", "text"):
        err_console.print("--log-format is json or text")
        raise typer.Exit(EXIT_CONFIG)
    with reported_errors():
        from billing.logs import configure_logging
        from starter.telemetry import enable_sdk_metrics, serve_metrics
        from starter.worker_process import run_worker

        configure_logging(json=log_format == "json")
        enable_sdk_metrics()
        if metrics_port:
            serve_metrics(metrics_port)
        run_until_signal(run_worker(store_runtime()))


def register(app: typer.Typer) -> None:
    app.command()(dev)
    app.command()(serve)
    app.command()(worker)
