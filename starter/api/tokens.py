"""Customer tokens (SPEC §5.10): `POST /v1/orgs/{org}/tokens` issues one, `DELETE
/v1/tokens/{token_id}` revokes one. Both need the operator token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.clock import utcnow
from billing.runtime import Runtime
from billing.tokens import (
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    SCOPES,
    Scope,
    issue,
)
from starter.api.deps import RuntimeDep, v1_router
from starter.api.errors import ErrorResponse

router = v1_router(
    tags=["customer tokens"],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        422: {"model": ErrorResponse, "description": "invalid body or id"},
    },
)

TOKEN_ID_PATTERN = r"^ctk_[A-Za-z0-9_-]{1,64}$"  # noqa: S105 (a pattern, not a secret)


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scopes: list[Scope] = Field(
        description='`["read"]`, or `["read", "purchase"]` to also buy packs and open the '
                    "Stripe billing portal")
    ttl_seconds: int = Field(default=DEFAULT_TTL_SECONDS, ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS,
                             description="how long the token lasts")

    @field_validator("scopes")
    @classmethod
    def _read_first(cls, value: list[Scope]) -> list[Scope]:
        if "read" not in value or len(set(value)) != len(value):
            raise ValueError('scopes are ["read"] or ["read", "purchase"]')
        return value


class IssuedTokenView(BaseModel):
    token: str = Field(description="the JWT: `Authorization: Bearer <token>`")
    token_id: str = Field(description="its id (`jti`), to revoke it")
    expires_at: datetime = Field(description="when the token stops working (whole seconds)")
    portal_url: str = Field(description="`<BILLING_PUBLIC_URL>/portal#token=<token>`: the "
                            "customer page, the token in the URL fragment")


NOT_CONFIGURED: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "organization not registered"},
    503: {"model": ErrorResponse, "description": "PORTAL_NOT_CONFIGURED: no BILLING_PORTAL_SECRET"},
}


def portal_url(public_url: str, token: str) -> str:
    """`<BILLING_PUBLIC_URL>/portal#token=<token>`: in the fragment, so it never reaches a log."""
    return f"{public_url.rstrip('/')}/portal#token={token}"


async def create(org: str, body: TokenRequest, runtime: Runtime) -> IssuedTokenView:
    """Issue a token for a registered organization and record it (what revocation finds)."""
    await runtime.accounts.get(org)
    now = utcnow()
    issued = issue(runtime.settings.portal_secrets, org,
                   frozenset(s for s in SCOPES if s in body.scopes),
                   ttl_seconds=body.ttl_seconds, now=now)
    await runtime.tokens.record(issued.claims, now)
    return IssuedTokenView(token=issued.token, token_id=issued.claims.token_id,
                           expires_at=issued.claims.expires_at,
                           portal_url=portal_url(runtime.settings.billing_public_url,
                                                 issued.token))


@router.post("/orgs/{org}/tokens", response_model=IssuedTokenView,
             status_code=status.HTTP_201_CREATED, summary="Issue a customer token",
             responses=NOT_CONFIGURED)
async def create_token(org: str, body: TokenRequest, runtime: RuntimeDep) -> IssuedTokenView:
    """A token the organization's end customer may use on its own reads (and, with `purchase`,
    Checkout and the billing portal), and the customer page's URL with it. Hand it to the
    customer's browser only: it is a bearer credential until it expires or is revoked."""
    return await create(org, body, runtime)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response, summary="Revoke a customer token",
               responses={404: {"model": ErrorResponse,
                                "description": "TOKEN_NOT_FOUND: unknown or already expired"}})
async def revoke_token(
    token_id: Annotated[str, Path(pattern=TOKEN_ID_PATTERN)], runtime: RuntimeDep
) -> Response:
    """Refused from the next request on, by every API process; revoking again changes
    nothing."""
    await runtime.tokens.revoke(token_id, utcnow())
    return Response(status_code=status.HTTP_204_NO_CONTENT)
