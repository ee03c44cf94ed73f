"""CLI commands for Stripe events and failures: `billing failures`, `billing retry`,
`billing send-test-event`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000/stripe/webhook"


def failures(
    org: Annotated[str | None, typer.Option("--org", help="only this organization")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List failed billing workflows (the dead letters), newest first."""
    from billing.config import Settings
    from starter.operations import list_failed
    from worker import connect

    async def run() -> list[dict[str, object]]:
        settings = Settings()
        client = await connect(settings)
        found = await list_failed(client, org=org, task_queue=settings.temporal_task_queue)
        return [failed.to_json() for failed in found]

    rows = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        console.print("no failed billing workflows")
        return
    table = Table("workflow id", "type", "org", "event type", "closed")
    for row in rows:
        table.add_row(*(escape(str(row[k] or "")) for k in
                        ("workflow_id", "workflow_type", "org_id", "event_type", "close_time")))
    console.print(table)
    console.print("retry one with [bold]billing retry WORKFLOW_ID[/bold], all with "
                  "[bold]billing retry --all-failed[/bold]")


def retry(
    workflow_id: Annotated[str | None, typer.Argument(help="the failed workflow's id")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="every failed workflow")] = False,
    org: Annotated[str | None, typer.Option("--org", help="with --all-failed: one org")] = None,
) -> None:
    """Run a failed workflow again from its first workflow task (writes are idempotent)."""
    from billing.config import Settings
    from billing.errors import BillingError
    from starter.operations import reset_to_first_task, retry_all_failed
    from worker import connect

    if (workflow_id is None) == (not all_failed):
        err_console.print("give either a WORKFLOW_ID or --all-failed")
        raise typer.Exit(2)

    async def run() -> list[tuple[str, str]]:
        settings = Settings()
        client = await connect(settings)
        if workflow_id is not None:
            return [(workflow_id, await reset_to_first_task(client, workflow_id))]
        return await retry_all_failed(client, org=org, task_queue=settings.temporal_task_queue)

    try:
        retried = asyncio.run(run())
    except BillingError as exc:
        err_console.print(f"[red]{exc.code}:[/red] {escape(exc.message)}")
        raise typer.Exit(1) from exc
    for wid, run_id in retried:
        console.print(f"retried {escape(wid)}: new run {run_id}")
    if not retried:
        console.print("no failed billing workflows")


def _webhook_secret(data_dir: Path) -> str:
    """`STRIPE_WEBHOOK_SECRET` (its first value), else the one `billing dev` generated."""
    from billing.config import Settings
    from starter.dev import CREDENTIALS_FILE

    configured = Settings().webhook_secrets
    if configured:
        return configured[0]
    path = data_dir / CREDENTIALS_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["webhook_secret"])
    except (OSError, ValueError, KeyError) as exc:
        err_console.print(f"no STRIPE_WEBHOOK_SECRET and no readable {path}: set the secret or "
                          "start [bold]billing dev[/bold] first")
        raise typer.Exit(2) from exc


def send_test_event(
    event_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="e.g. payment_intent.succeeded")
    ],
    org: Annotated[str, typer.Option("--org", help="organization in the metadata")] = "acme",
    pack: Annotated[str | None, typer.Option("--pack", help="pack id (default: the first)")] = None,
    payment_intent: Annotated[
        str | None, typer.Option("--payment-intent", help="refer to an earlier sample purchase")
    ] = None,
    url: Annotated[str, typer.Option("--url", help="the webhook receiver")] = DEFAULT_URL,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="billing dev's data directory (its secret)")
    ] = Path(".billing-dev"),
) -> None:
    """Post a correctly signed sample Stripe event to the webhook receiver."""
    import httpx

    from billing.config import Settings, load_config
    from starter.sample_events import sample_event, signed_body

    config = load_config(Settings().billing_config)
    try:
        event = sample_event(event_type, config, org=org, pack_id=pack,
                             payment_intent=payment_intent)
    except ValueError as exc:
        err_console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    body, signature = signed_body(event, _webhook_secret(data_dir))
    try:
        response = httpx.post(url, content=body, timeout=30.0, headers={
            "Content-Type": "application/json", "Stripe-Signature": signature})
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {escape(url)}:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    console.print(f"{event['type']} {event['id']} -> HTTP {response.status_code} "
                  f"{escape(response.text)}")
    if response.status_code != 200:
        raise typer.Exit(1)
    sent = event["data"]["object"]
    console.print(f"workflow [bold]stripe-{event['id']}[/bold]: see it in the Temporal Web UI")
    if sent.get("payment_intent"):
        console.print(f"payment intent {sent['payment_intent']} (refund or dispute it with "
                      f"--payment-intent {sent['payment_intent']})")


def register(app: typer.Typer) -> None:
    app.command()(failures)
    app.command()(retry)
    app.command("send-test-event")(send_test_event)
