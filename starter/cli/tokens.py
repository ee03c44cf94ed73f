"""`billing token ORG`: a customer token and the customer page's URL (SPEC §5.10)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from starter.cli.output import reported_errors, store_runtime

if TYPE_CHECKING:
    from starter.api.tokens import IssuedTokenView


def token(
    org: Annotated[str, typer.Argument(help="organization id")],
    purchase: Annotated[bool, typer.Option(
        "--purchase", help="may also buy packs and open the Stripe billing portal")] = False,
    ttl: Annotated[int, typer.Option(
        "--ttl", metavar="S", min=60, max=86400, help="seconds the token lasts")] = 3600,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """Issue a customer token for ORG and print the customer page's URL (the token is in its
    fragment). Revoke it with DELETE /v1/tokens/{token_id} (see --json)."""
    from starter.api.tokens import TokenRequest, create

    async def run() -> IssuedTokenView:
        runtime = store_runtime()
        try:
            runtime.settings.check_portal()
            scopes: list[Literal["read", "purchase"]] = ["read", "purchase"] if purchase \
                else ["read"]
            return await create(org, TokenRequest(scopes=scopes, ttl_seconds=ttl), runtime)
        finally:
            await runtime.db.close()

    with reported_errors():
        issued = asyncio.run(run())
    if as_json:
        typer.echo(issued.model_dump_json())
        return
    typer.echo(issued.portal_url)
    typer.echo(f"token id {issued.token_id}, expires {issued.expires_at:%Y-%m-%d %H:%M:%S} UTC",
               err=True)


def register(app: typer.Typer) -> None:
    app.command()(token)
