"""`billing webhooks`: outbound webhooks (SPEC §5.7). `billing webhooks test` sends a signed
sample notification to each receiver and shows what each answered."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from starter.cli.output import EXIT_ERROR, err_console, print_table, reported_errors

webhooks_app = typer.Typer(help="Outbound webhooks: the engine's notifications sent to the app.",
                           no_args_is_help=True)


@webhooks_app.command("test")
def test_receivers(
    url: Annotated[
        str | None, typer.Option("--url", help="send to this URL instead of BILLING_WEBHOOK_URL")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """POST a signed sample notification (type `webhook.test`) to every receiver, or to --url,
    signed with BILLING_WEBHOOK_SECRET; exits 1 unless every receiver answers 2xx."""
    from billing.config import Settings
    from starter.webhook_dispatch import send_test

    with reported_errors():
        results = asyncio.run(send_test(Settings(), url))
    if not results:
        err_console.print("[red]no receiver:[/red] set BILLING_WEBHOOK_URL or pass --url")
        raise typer.Exit(EXIT_ERROR)
    if as_json:
        typer.echo(json.dumps([{"url": r.url, "status": r.status, "error": r.error, "ok": r.ok}
                               for r in results]))
    else:
        table = Table(title="webhook test")
        table.add_column("receiver")
        table.add_column("answer")
        for result in results:
            answer = str(result.status) if result.status is not None else escape(
                result.error or "")
            table.add_row(escape(result.url),
                          f"[green]{answer}[/green]" if result.ok else f"[red]{answer}[/red]")
        print_table(table)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    app.add_typer(webhooks_app, name="webhooks")
