"""`billing auto-topup ORG`: show an organization's automatic top-up, or set it (SPEC §5.8)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from starter.cli.output import console, reported_errors, store_runtime

if TYPE_CHECKING:
    from starter.api.auto_topup import AutoTopUpView


def _print(view: AutoTopUpView, org: str) -> None:
    if not view.enabled:
        state = "[yellow]disabled[/yellow]"
    elif view.paused:
        state = "[red]paused[/red] (three failed top-ups in a row: --enable resumes)"
    else:
        state = "[green]enabled[/green]"
    console.print(f"[bold]{escape(org)}[/bold]: auto top-up {state}")
    if view.pack_id is not None:
        console.print(f"buys {escape(view.pack_id)} when a write takes the balance below "
                      f"{view.below_units} units; {view.this_month} of at most "
                      f"{view.max_per_month} this month (UTC)")


def auto_topup(
    org: Annotated[str, typer.Argument(help="organization id")],
    enable: Annotated[bool | None, typer.Option(
        "--enable/--disable", help="turn auto top-up on (also resumes a pause) or off")] = None,
    pack: Annotated[str | None, typer.Option("--pack", metavar="P", help="pack to buy")] = None,
    below: Annotated[int | None, typer.Option(
        "--below", metavar="N", min=0, help="buy when the balance falls below N units")] = None,
    max_per_month: Annotated[int | None, typer.Option(
        "--max-per-month", metavar="M", min=0, max=10_000,
        help="at most M top-ups per calendar month")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """Show an organization's automatic top-up; with options, change them first (the options
    not given keep their stored value). A refusal prints its code and exits 1."""
    from billing.errors import InvalidInput
    from starter.api.auto_topup import AutoTopUpSettings, configure, read

    async def run() -> AutoTopUpView:
        runtime = store_runtime()
        try:
            if (enable, pack, below, max_per_month) != (None, None, None, None):
                current = await read(org, runtime)
                pack_id = pack or current.pack_id
                if pack_id is None:
                    raise InvalidInput("no pack configured yet: pass --pack",
                                       code="VALIDATION_ERROR")
                await configure(org, AutoTopUpSettings(
                    enabled=current.enabled if enable is None else enable, pack_id=pack_id,
                    below_units=current.below_units if below is None else below,
                    max_per_month=(current.max_per_month if max_per_month is None
                                   else max_per_month),
                ), runtime)
            return await read(org, runtime)
        finally:
            await runtime.db.close()

    with reported_errors():
        view = asyncio.run(run())
    if as_json:
        typer.echo(view.model_dump_json())
    else:
        _print(view, org)


def register(app: typer.Typer) -> None:
    app.command("auto-topup")(auto_topup)
