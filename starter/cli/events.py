"""CLI commands for Stripe events and failures: `billing failures`, `billing retry`,
`billing replay`, `billing send-test-event`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from billing.store.database import Doc
    from starter.operations.failures import FailedWorkflow
    from starter.operations.progress import OnProgress
    from starter.operations.replay import ReplayResult
    from starter.operations.retries import RetryReport

from starter.cli.output import (
    console,
    dev_value,
    err_console,
    operator_errors,
    print_table,
    progress_bars,
    reported_errors,
    store_runtime,
    temporal,
)

DEFAULT_URL = "http://127.0.0.1:8000/stripe/webhook"


def failures(
    org: Annotated[str | None, typer.Option("--org", help="only this organization")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List what needs an operator, newest first: failed billing workflows (the dead letters)
    with their root cause, then Stripe events recorded `unresolved` with their reason."""
    from billing.config import Settings
    from starter.operations.failures import list_failed, list_unresolved

    async def run(on_progress: OnProgress) -> list[FailedWorkflow]:
        settings = Settings()
        client = await temporal()
        failed = await list_failed(client, org=org, task_queue=settings.temporal_task_queue,
                                   on_progress=on_progress)
        runtime = store_runtime()
        try:
            return failed + await list_unresolved(runtime.db, org=org)
        finally:
            await runtime.db.close()

    with operator_errors(), progress_bars("reading failed workflows") as (on_progress,):
        found = asyncio.run(run(on_progress))
    if as_json:
        typer.echo(json.dumps([failed.to_json() for failed in found]))
        return
    if not found:
        console.print("no failed billing workflows and no unresolved Stripe events")
        return
    table = Table(title=f"{len(found)} failed workflow(s) and unresolved event(s), newest first")
    table.add_column("kind", no_wrap=True)
    table.add_column("workflow id")
    table.add_column("type")
    table.add_column("org")
    table.add_column("event type")
    table.add_column("failure")
    table.add_column("at (UTC)", no_wrap=True)
    for failed in found:
        table.add_row(
            failed.kind, escape(failed.workflow_id), failed.workflow_type,
            escape(failed.org_id or ""), escape(failed.event_type or ""),
            escape(failed.failure or ""),
            f"{failed.close_time:%Y-%m-%d %H:%M:%S}" if failed.close_time else "",
        )
    print_table(table)
    console.print("retry one with [bold]billing retry WORKFLOW_ID[/bold], all with "
                  "[bold]billing retry --all-failed[/bold]; a Stripe event (failed or unresolved) "
                  "can be fetched and run again with [bold]billing replay EVT_ID[/bold]")


def retry(
    workflow_id: Annotated[str | None, typer.Argument(help="the failed workflow's id")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="every failed workflow")] = False,
    org: Annotated[str | None, typer.Option("--org", help="with --all-failed: one org")] = None,
) -> None:
    """Run failed workflows again from their first workflow task (writes are idempotent).

    --all-failed resets them with a Temporal batch operation and waits for it to finish."""
    from billing.config import Settings
    from starter.operations.retries import reset_to_first_task, retry_all_failed

    if (workflow_id is None) == (not all_failed):
        err_console.print("give either a WORKFLOW_ID or --all-failed")
        raise typer.Exit(2)
    if org is not None and not all_failed:
        err_console.print("--org selects among --all-failed")
        raise typer.Exit(2)
    settings = Settings()

    if workflow_id is not None:
        async def one() -> str:
            client = await temporal()
            return await reset_to_first_task(client, workflow_id)

        with operator_errors():
            run_id = asyncio.run(one())
        console.print(f"retried {escape(workflow_id)}: new run {run_id}")
        return

    async def every(on_listing: OnProgress, on_progress: OnProgress) -> RetryReport:
        client = await temporal()
        return await retry_all_failed(client, org=org, task_queue=settings.temporal_task_queue,
                                      on_listing=on_listing, on_progress=on_progress)

    with operator_errors(), progress_bars("finding failed workflows",
                                          "resetting") as (on_listing, on_progress):
        report = asyncio.run(every(on_listing, on_progress))
    if not report.workflow_ids:
        console.print("no failed billing workflows")
        return
    how = (f"batch job {', '.join(report.job_ids)}" if report.method == "batch"
           else "one reset per workflow: the server has no batch operations")
    console.print(f"failed workflows: {len(report.workflow_ids)}, reset: [bold]{report.reset}"
                  f"[/bold], not reset: {report.failed} ({how})")
    if report.failed:
        console.print("list what is left with [bold]billing failures[/bold]")
        raise typer.Exit(1)


def _print_replay(result: ReplayResult) -> None:
    if result.outcome is None:
        err_console.print(f"[red]{escape(result.workflow_id)} failed:[/red] "
                          f"{escape(result.failure or 'no failure recorded')}")
        return
    outcome = result.outcome
    reason = f" ({escape(outcome.reason)})" if outcome.reason else ""
    console.print(f"{escape(result.workflow_id)} run {result.run_id}: {escape(outcome.type)} "
                  f"[bold]{outcome.outcome}[/bold]{reason}")
    for written in outcome.written:
        console.print(f"  wrote {escape(written)}")
    if not outcome.written:
        console.print("  wrote nothing")


def replay(
    event_id: Annotated[str, typer.Argument(metavar="EVT_ID", help="the Stripe event id")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Retrieve a Stripe event from Stripe and run it again, as a new run of stripe-<EVT_ID>.

    An event already applied comes back `duplicate` and writes nothing (ledger keys)."""
    from billing.config import Settings
    from starter.operations.replay import replay_event, replay_request

    async def run() -> ReplayResult:
        settings = Settings()
        client = await temporal()
        return await replay_event(client, event_id, task_queue=settings.temporal_task_queue)

    with operator_errors():
        replay_request(event_id)
        with err_console.status(f"replaying {escape(event_id)}: waiting for its outcome "
                                "(Ctrl-C stops waiting, not the run) ..."):
            result = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps(result.to_json()))
    else:
        _print_replay(result)
    if result.outcome is None:
        raise typer.Exit(1)


def _webhook_secret(data_dir: Path) -> str:
    """`STRIPE_WEBHOOK_SECRET` (its first value), else the one `billing dev` generated."""
    from billing.config import Settings

    return dev_value(data_dir, "webhook_secret", Settings().webhook_secrets,
                     "STRIPE_WEBHOOK_SECRET")


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
    checkout: Annotated[str | None, typer.Option(
        "--checkout", metavar="CHECKOUT_ID",
        help="checkout.session.completed only: pay this checkout (billing checkout) on billing "
             "dev's Stripe stand-in, which then sends the purchase's events")] = None,
) -> None:
    """Post a correctly signed sample Stripe event to the webhook receiver."""
    import httpx

    from billing.config import Settings, load_config
    from starter.sample_events import sample_event, signed_body

    if checkout is not None:
        if event_type != "checkout.session.completed":
            err_console.print("--checkout pays a checkout: its event is "
                              "checkout.session.completed")
            raise typer.Exit(2)
        _pay_checkout(checkout)
        return
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


def _pay_checkout(checkout_id: str) -> None:
    """Pay a checkout on billing dev's Stripe stand-in, as a customer paying on Checkout would;
    the stand-in then delivers the purchase's events, signed, to the stack's webhook."""
    import httpx

    async def read() -> Doc | None:
        runtime = store_runtime()
        try:
            return await runtime.checkouts.get(checkout_id)
        finally:
            await runtime.db.close()

    with reported_errors():
        record = asyncio.run(read())
    if record is None or not record.get("url"):
        err_console.print(f"no checkout {escape(checkout_id)} with a session: make one with "
                          "[bold]billing checkout ORG --pack P[/bold]")
        raise typer.Exit(1)
    url = str(record["url"])
    try:
        response = httpx.post(url, headers={"Accept": "application/json"}, timeout=60.0)
        paid = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        paid = None
    if not isinstance(paid, dict) or "events" not in paid:
        err_console.print(f"{escape(url)} is not billing dev's Stripe stand-in (or it stopped): "
                          "pay the checkout on that page; Stripe sends the events")
        raise typer.Exit(1)
    console.print(f"paid {escape(checkout_id)} (session {escape(paid['session']['id'])})")
    for sent in paid["events"]:
        console.print(f"{sent['type']} {sent['id']} -> HTTP {sent['status']} "
                      f"{escape(sent['answer'])}")
    if any(sent["status"] != 200 for sent in paid["events"]):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(failures)
    app.command()(retry)
    app.command()(replay)
    app.command("send-test-event")(send_test_event)
