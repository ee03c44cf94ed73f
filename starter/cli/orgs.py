"""Reading one organization: `billing balance`, `billing ledger`, `billing meter`,
`billing holds`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from starter.cli.output import console, print_table, reported_errors, store_runtime


def balance(
    org: Annotated[str, typer.Argument(help="organization id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """An organization's extras balance and its open lots (in the order debits take them)."""
    from starter.api import orgs

    async def read() -> orgs.Balance:
        runtime = store_runtime()
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
    table.add_column("lot")
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
        print_table(table)
    else:
        console.print("no open lots")


def ledger(
    org: Annotated[str, typer.Argument(help="organization id")],
    limit: Annotated[int, typer.Option(min=1, max=200, help="entries to show")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """An organization's ledger entries, newest first."""
    from starter.api import orgs

    async def read() -> orgs.LedgerPage:
        runtime = store_runtime()
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
    table.add_column("key")
    table.add_column("lot")
    table.add_column("memo")
    for entry in page.entries:
        table.add_row(
            f"{entry.created_at:%Y-%m-%d %H:%M:%S}", entry.kind, f"{entry.amount:+d}",
            escape(entry.key), entry.lot_id or "", escape(entry.memo),
        )
    print_table(table)
    if page.next_cursor:
        console.print("more entries: raise --limit (at most 200) or page "
                      f"GET /v1/orgs/{escape(org)}/ledger?cursor={page.next_cursor}")


def meter(
    org: Annotated[str, typer.Argument(help="organization id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """This ISO week's meter of an organization: used, quota, plan and what remains."""
    from billing.store.meters import Meters
    from starter.api import metering

    async def read() -> metering.MeterResponse:
        runtime = store_runtime()
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
    for column in ("plan", "used", "quota", "held", "remaining"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    table.add_row(view.plan_id, str(view.used), str(view.quota), str(view.held),
                  str(view.remaining))
    print_table(table)


def holds(
    org: Annotated[str, typer.Argument(help="organization id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """An organization's active balance holds, soonest expiry first."""
    from starter.api import holds as api_holds

    async def read() -> api_holds.HoldsResponse:
        runtime = store_runtime()
        try:
            return await api_holds.active(org, runtime)
        finally:
            await runtime.db.close()

    with reported_errors():
        found = asyncio.run(read())
    if as_json:
        typer.echo(found.model_dump_json())
        return
    if not found.holds:
        console.print(f"no active holds for {escape(org)}")
        return
    table = Table(title=f"active holds of {escape(org)}: "
                        f"{sum(hold.units for hold in found.holds)} units")
    table.add_column("hold")
    table.add_column("units", justify="right", no_wrap=True)
    table.add_column("expires at (UTC)", no_wrap=True)
    for hold in found.holds:
        table.add_row(escape(hold.hold_id), str(hold.units),
                      f"{hold.expires_at:%Y-%m-%d %H:%M:%S}")
    print_table(table)


def register(app: typer.Typer) -> None:
    app.command()(balance)
    app.command()(ledger)
    app.command()(meter)
    app.command()(holds)
