"""`billing reconcile`: run the reconciliation now (`--now`), or show the latest report."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from billing.models import ReconcileReport

from starter.cli.output import (
    console,
    err_console,
    operator_errors,
    print_table,
    store_runtime,
    temporal,
)

#: Divergences listed in the table; the JSON output and the stored report hold more.
SHOWN = 50


def new_reconcile_id() -> str:
    from billing.clock import utcnow

    return f"reconcile-manual-{utcnow():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


async def run_now() -> ReconcileReport:
    """Start `ReconcileWorkflow` under a fresh id and wait for its report."""
    from billing.config import Settings
    from workflows.reconcile import ReconcileWorkflow

    settings = Settings()
    client = await temporal()
    return await client.execute_workflow(
        ReconcileWorkflow.run, id=new_reconcile_id(), task_queue=settings.temporal_task_queue
    )


async def latest() -> ReconcileReport | None:
    runtime = store_runtime()
    try:
        return await runtime.reports.latest_report()
    finally:
        await runtime.db.close()


def print_report(report: ReconcileReport) -> None:
    c = report.counts
    finished = f"{report.finished_at:%Y-%m-%d %H:%M:%S}" if report.finished_at else "running"
    console.print(f"[bold]{escape(report.report_id)}[/bold]: week {report.week}, started "
                  f"{report.started_at:%Y-%m-%d %H:%M:%S} UTC, finished {finished}")
    summary = Table(title="reconciliation")
    summary.add_column("check")
    summary.add_column("checked", justify="right")
    summary.add_column("divergent", justify="right")
    summary.add_column("notes")
    summary.add_row("(a) ledger", str(c.orgs), str(c.ledger_divergent), "organizations")
    summary.add_row("(b) meter vs debits", str(c.orgs), str(c.meter_divergent), "organizations")
    summary.add_row("(c) subscriptions", str(c.subscriptions_checked),
                    str(c.subscription_divergent),
                    f"{c.subscriptions_unverified} not readable from Stripe")
    summary.add_row("(d) missed events", str(c.events_listed), str(c.events_missed),
                    f"{c.events_repaired} repaired, {c.events_already_started} already started, "
                    f"{c.events_failed} failed")
    console.print(summary)
    if report.events_error:
        console.print(f"[yellow]missed events not fully checked:[/yellow] "
                      f"{escape(report.events_error)}")
    if report.divergences:
        table = Table(title=f"divergences ({report.divergences_total})")
        for column in ("org", "check", "kind", "subject", "expected", "actual"):
            table.add_column(column)
        for d in report.divergences[:SHOWN]:
            table.add_row(*(escape(str(v if v is not None else "")) for v in (
                d.org_id, d.check, d.kind, d.subject, d.expected, d.actual)))
        print_table(table)
        if report.divergences_total > SHOWN:
            console.print(f"{report.divergences_total - SHOWN} more: see --json or the "
                          f"`reports` document {escape(report.report_id)}")
    if report.repaired_events:
        table = Table(title="missed events run now")
        for column in ("event", "type", "outcome"):
            table.add_column(column)
        for event in report.repaired_events:
            table.add_row(escape(event.event_id), event.type, event.outcome)
        print_table(table)


def reconcile(
    now: Annotated[bool, typer.Option(
        "--now", help="run a reconciliation now and wait for its report")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check ledgers, meters, subscriptions and missed Stripe events (without --now: show the
    latest report)."""
    from temporalio.client import WorkflowFailureError

    report: ReconcileReport | None
    if now:
        try:
            with operator_errors(), err_console.status(
                    "reconciling every organization, then the Stripe events"):
                report = asyncio.run(run_now())
        except WorkflowFailureError as exc:
            err_console.print(f"[red]the reconciliation failed:[/red] {escape(str(exc.cause))}")
            raise typer.Exit(1) from exc
    else:
        with operator_errors():
            report = asyncio.run(latest())
    if report is None:
        err_console.print("no reconciliation report yet: run [bold]billing reconcile --now[/bold]")
        raise typer.Exit(1)
    if as_json:
        typer.echo(report.model_dump_json())
        return
    print_report(report)


def register(app: typer.Typer) -> None:
    app.command()(reconcile)
