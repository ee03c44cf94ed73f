"""`billing checkout ORG`: a Stripe Checkout URL for a pack or a plan (SPEC §5.9), asked of the
running engine as an app asks it, so the session is made with the engine's Stripe account and
configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from starter.cli.output import EXIT_CONFIG, EXIT_ERROR, console, dev_value, err_console


def _describe(answer: dict[str, Any], org: str) -> str:
    if answer.get("pack_id"):
        lasting = (f", lasting at most {answer['lot_expires_at_most_days']} days"
                   if answer.get("lot_expires_at_most_days") else ", never expiring")
        what = (f"pack {answer['pack_id']} x{answer['quantity']} ({answer['units']} units"
                f"{lasting})")
    else:
        what = f"plan {answer['plan_id']}"
    return f"checkout [bold]{answer['checkout_id']}[/bold] for {escape(org)}: {escape(what)}"


def checkout(
    org: Annotated[str, typer.Argument(help="organization id")],
    pack: Annotated[str | None, typer.Option("--pack", metavar="P", help="pack to buy")] = None,
    quantity: Annotated[int, typer.Option("--quantity", metavar="N", min=1, max=100,
                                          help="packs to buy")] = 1,
    plan: Annotated[str | None, typer.Option("--plan", metavar="P",
                                             help="plan to subscribe to")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", metavar="K", help="the same K again answers the same session")
    ] = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="the engine's API (default BILLING_PUBLIC_URL)")] = None,
    data_dir: Annotated[Path, typer.Option(
        "--data-dir", help="billing dev's data directory (its API token)")
    ] = Path(".billing-dev"),
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """Print a Stripe Checkout URL that buys N packs or subscribes to a plan. Paying it credits
    the organization (the engine's checkout record decides, whatever the session's metadata
    says); with billing dev's Stripe stand-in, pay it with `billing send-test-event
    checkout.session.completed --checkout CHECKOUT_ID`."""
    import httpx

    from billing.config import Settings

    if (pack is None) == (plan is None):
        err_console.print("give either --pack P or --plan P")
        raise typer.Exit(EXIT_CONFIG)
    settings = Settings()
    base = (url or settings.billing_public_url).rstrip("/")
    token = dev_value(data_dir, "api_token", settings.api_tokens, "BILLING_API_TOKEN")
    body: dict[str, Any] = {"pack_id": pack, "quantity": quantity} if pack else {"plan_id": plan}
    headers = {"Authorization": f"Bearer {token}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    try:
        response = httpx.post(f"{base}/v1/orgs/{org}/checkout", json=body, headers=headers,
                              timeout=60.0)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach the engine at {escape(base)}:[/red] "
                          f"{escape(str(exc))} (is billing serve or billing dev running?)")
        raise typer.Exit(EXIT_ERROR) from exc
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": {"code": f"HTTP_{response.status_code}", "message": response.text}}
    if response.status_code != 200:
        error = answer.get("error") or {}
        err_console.print(f"[red]{escape(str(error.get('code')))}:[/red] "
                          f"{escape(str(error.get('message')))}")
        raise typer.Exit(EXIT_ERROR)
    if as_json:
        typer.echo(json.dumps(answer))
        return
    console.print(_describe(answer, org))
    console.print(f"expires at {escape(str(answer['expires_at']))}; open:")
    console.print(escape(answer["url"]), soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(checkout)
