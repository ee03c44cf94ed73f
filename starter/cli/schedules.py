"""`billing schedules`: the engine's Temporal schedules, and running one now."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from starter.cli.output import console, err_console, operator_errors, print_table, temporal

if TYPE_CHECKING:
    from starter.operations.schedule_views import ScheduleView, TriggerResult


def _when(moment: object) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment is not None else ""


def _print_schedules(views: list[ScheduleView]) -> None:
    table = Table(title="schedules (times in UTC)")
    table.add_column("schedule", no_wrap=True)
    table.add_column("workflow")
    table.add_column("runs")
    table.add_column("next run", no_wrap=True)
    table.add_column("paused")
    table.add_column("overlap")
    table.add_column("last run", no_wrap=True)
    table.add_column("last workflow id")
    for view in views:
        if not view.exists:
            table.add_row(view.id, view.workflow, "[yellow]not created: start the worker[/yellow]",
                          "", "", "", "", "")
            continue
        table.add_row(
            view.id, view.workflow, escape(view.spec or ""),
            _when(view.next_runs[0] if view.next_runs else None),
            "[yellow]yes[/yellow]" if view.paused else "no", view.overlap or "",
            _when(view.last_run) or "never", escape(view.last_workflow_id or ""),
        )
    print_table(table)


def _print_trigger(result: TriggerResult) -> None:
    if result.skipped:
        console.print(f"{result.schedule_id}: a run is still in progress and the overlap policy "
                      "skipped this one")
    elif result.workflow_id is None:
        console.print(f"{result.schedule_id}: triggered; no run seen yet (see the Web UI)")
    else:
        console.print(f"{result.schedule_id}: started workflow "
                      f"[bold]{escape(result.workflow_id)}[/bold]")


def schedules(
    trigger: Annotated[
        str | None, typer.Option("--trigger", metavar="NAME", help="run this schedule now")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the engine's schedules (times, next run, paused, last run), or run one now."""
    from starter.operations.schedule_views import list_schedules, trigger_schedule

    async def listed() -> list[ScheduleView]:
        return await list_schedules(await temporal())

    async def triggered(name: str) -> TriggerResult:
        return await trigger_schedule(await temporal(), name)

    if trigger is None:
        with operator_errors():
            views = asyncio.run(listed())
        if as_json:
            typer.echo(json.dumps([view.to_json() for view in views]))
        else:
            _print_schedules(views)
        return
    with operator_errors(), err_console.status(f"triggering {escape(trigger)} ..."):
        result = asyncio.run(triggered(trigger))
    if as_json:
        typer.echo(json.dumps({"schedule_id": result.schedule_id,
                               "workflow_id": result.workflow_id, "skipped": result.skipped}))
    else:
        _print_trigger(result)


def register(app: typer.Typer) -> None:
    app.command()(schedules)
