"""Request dependencies: the runtime, the Temporal client and bearer-token auth."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any

import stripe
from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from temporalio.client import Client

from billing.errors import BillingError
from billing.runtime import Runtime
from billing.stripe_client import stripe_client
from billing.tokens import CustomerToken, authorize, looks_like_jwt, verify
from starter.api.errors import ErrorResponse
from starter.temporal_client import TemporalUnavailable, connect

logger = logging.getLogger(__name__)


class Unauthorized(BillingError):
    status = 401
    code = "UNAUTHORIZED"


@dataclass
class AppState:
    """What the app holds for its lifetime; the Temporal client is connected lazily."""

    runtime: Runtime
    temporal: Client | None = None
    temporal_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @cached_property
    def stripe(self) -> stripe.StripeClient:
        """The client of the purchases the API starts (SPEC §5.9); it retries a network error
        itself, as every write it makes carries an idempotency key."""
        return stripe_client(self.runtime.settings, network_retries=2)


async def temporal_client(state: AppState) -> Client:
    """The app's Temporal client, connected on first use so the API serves reads while Temporal
    is down. Raises `TemporalUnavailable` (503) when it cannot connect; the next call retries."""
    if state.temporal is not None:
        return state.temporal
    async with state.temporal_lock:
        if state.temporal is None:
            try:
                state.temporal = await connect(state.runtime.settings)
            except TemporalUnavailable as exc:
                logger.warning("%s", exc.message)
                raise
        return state.temporal


async def app_state(request: Request) -> AppState:
    """The app's state. This and every dependency are `async def`: FastAPI runs a plain `def`
    dependency in a worker thread, and those hand-offs took about 0.4 ms of each request."""
    state: AppState = request.app.state.billing
    return state


async def runtime(state: Annotated[AppState, Depends(app_state)]) -> Runtime:
    return state.runtime


_bearer = HTTPBearer(auto_error=False)


async def require_token(
    request: Request,
    state: Annotated[AppState, Depends(app_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """`Authorization: Bearer <token>` against `BILLING_API_TOKEN` (any of its comma-separated
    values), compared in constant time; a bearer shaped like a JWT that is none of them is a
    customer token, held to what it may call (`customer_access`)."""
    if credentials is None:
        raise Unauthorized("missing bearer token")
    presented = credentials.credentials.encode()
    valid = False
    for token in state.runtime.settings.api_tokens:
        valid |= hmac.compare_digest(presented, token.encode())
    if not valid:
        if not looks_like_jwt(credentials.credentials):
            raise Unauthorized("invalid bearer token")
        await customer_access(request, state.runtime, credentials.credentials)


async def customer_access(request: Request, runtime: Runtime, bearer: str) -> None:
    """A customer token passes when it verifies, is live in MongoDB (issued, not revoked: read
    on every request) and may call the matched route on its own organization; else 401
    `TOKEN_INVALID` or 403 `FORBIDDEN`."""
    claims = verify(runtime.settings.portal_secrets, bearer)
    await runtime.tokens.check_live(claims)
    route = str(getattr(request.scope.get("route"), "path_format", ""))
    authorize(claims, request.method, route, request.path_params.get("org"))
    request.state.customer = claims


def customer_of(request: Request) -> CustomerToken | None:
    """The customer token the request was let in with; None for the operator's token."""
    claims: CustomerToken | None = getattr(request.state, "customer", None)
    return claims


#: Every `/v1` route may answer it: a customer token asked for more than it may do.
FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {
    "model": ErrorResponse,
    "description": "FORBIDDEN: a customer token (SPEC §5.10) calls only its own organization's "
                   "reads, and with `purchase` its checkout and billing portal"}}


def v1_router(**options: Any) -> APIRouter:
    """A router of the `/v1` API: under `/v1` and behind the bearer token. Routers carry their
    own prefix so the matched route's `path_format` is the full template (metrics label)."""
    options["responses"] = {**FORBIDDEN, **options.get("responses", {})}
    return APIRouter(prefix="/v1", dependencies=[Depends(require_token)], **options)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
StateDep = Annotated[AppState, Depends(app_state)]
