"""CLI commands for admin adjustments: `billing credit`, `billing approve`, `billing reject`,
`billing adjustment`."""

from __future__ import annotations

import asyncio
import getpass
import json
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from billing.models import AdjustmentStatus, AdminResult

from starter.cli.output import console, operator_errors, temporal


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def credit(
    org: Annotated[str, typer.Argument(help="organization id")],
    units: Annotated[int, typer.Argument(help="units to add (negative to debit)")],
    reason: Annotated[str, typer.Option("--reason", help="why (at least 3 characters)")],
    request_id: Annotated[str | None, typer.Option("--request-id", help="idempotency id")] = None,
    by: Annotated[str, typer.Option("--by", help="who asks")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait for the result")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Credit or debit an organization's extras through AdminAdjustmentWorkflow."""
    from billing.config import Settings
    from billing.models import AdminRequest
    from starter.operations.adjustments import new_request_id, start_adjustment
    from workflows.admin_adjustment import AdminAdjustmentWorkflow

    try:
        request = AdminRequest(request_id=request_id or new_request_id(), org_id=org, units=units,
                               reason=reason, requested_by=by or _operator())
    except ValidationError as exc:
        messages = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        console.print(f"[red]invalid adjustment:[/red] {messages}")
        raise typer.Exit(2) from exc

    async def run() -> dict[str, object]:
        settings = Settings()
        client = await temporal()
        handle, started = await start_adjustment(client, request, settings.temporal_task_queue)
        out: dict[str, object] = {"request_id": request.request_id, "workflow_id": handle.id,
                                  "started": started}
        if not wait:
            return out
        await asyncio.sleep(0.5)
        desc = await handle.describe()
        if desc.status is not None and desc.status.name == "RUNNING" and await handle.query(
            AdminAdjustmentWorkflow.waiting_for_approval
        ):
            out["status"] = "waiting_for_approval"
            return out
        out.update((await handle.result()).model_dump())
        return out

    with operator_errors():
        out = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps(out))
        return
    console.print(f"request id: [bold]{out['request_id']}[/bold] (workflow {out['workflow_id']})")
    status = out.get("status", "started")
    if status == "waiting_for_approval":
        console.print("waiting for a second operator: "
                      f"[bold]billing approve {out['request_id']}[/bold] or billing reject")
    else:
        console.print(f"status: [bold]{status}[/bold]"
                      + (f", balance {out['balance']}" if out.get("balance") is not None else ""))


def _decide(request_id: str, approve: bool, by: str, note: str) -> None:
    """Decide through the workflow's `decide` update: print the outcome, or why the workflow
    refused the decision and exit 1."""
    from starter.operations.adjustments import decide

    async def run() -> AdminResult:
        client = await temporal()
        return await decide(client, request_id, approve=approve, by=by or _operator(),
                            note=note)

    with operator_errors():
        result = asyncio.run(run())
    verb = "approved" if approve else "rejected"
    balance = f", balance {result.balance}" if result.balance is not None else ""
    console.print(f"{verb}: {request_id}: [bold]{result.status}[/bold] {result.units:+d} units"
                  f"{balance}")


def approve(
    request_id: Annotated[str, typer.Argument(help="the adjustment's request id")],
    by: Annotated[str, typer.Option("--by", help="who approves (not the requester)")] = "",
) -> None:
    """Approve an adjustment that waits for a second operator; prints the outcome. Exits 1 with
    the reason when the workflow refuses (a self-approval, or nothing waits for a decision)."""
    _decide(request_id, True, by, "")


def reject(
    request_id: Annotated[str, typer.Argument(help="the adjustment's request id")],
    by: Annotated[str, typer.Option("--by", help="who rejects")] = "",
    note: Annotated[str, typer.Option("--note", help="why")] = "",
) -> None:
    """Reject an adjustment that waits for a second operator; nothing is written."""
    _decide(request_id, False, by, note)


def adjustment(
    request_id: Annotated[str, typer.Argument(help="the adjustment's request id")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Where an adjustment stands, and the decisions it refused (say, a self-approval sent as a
    plain `temporal workflow signal`)."""
    from starter.operations.adjustments import adjustment_status

    async def run() -> AdjustmentStatus:
        return await adjustment_status(await temporal(), request_id)

    with operator_errors():
        found = asyncio.run(run())
    if as_json:
        typer.echo(found.model_dump_json())
        return
    request = found.request
    console.print(f"{request.request_id}: {request.units:+d} units for {request.org_id}, asked by "
                  f"{request.requested_by} ({request.reason}): [bold]{found.phase}[/bold]")
    for refused in found.refused:
        console.print(f"[yellow]refused[/yellow] {refused.action} by {refused.by}: "
                      f"{refused.reason}")


def register(app: typer.Typer) -> None:
    app.command()(credit)
    app.command()(approve)
    app.command()(reject)
    app.command()(adjustment)
