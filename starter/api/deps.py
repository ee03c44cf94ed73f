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


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.billing
    return state


def runtime(state: Annotated[AppState, Depends(app_state)]) -> Runtime:
    return state.runtime


_bearer = HTTPBearer(auto_error=False)


def require_token(
    state: Annotated[AppState, Depends(app_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """`Authorization: Bearer <token>` against `BILLING_API_TOKEN` (any of its comma-separated
    values), compared in constant time."""
    if credentials is None:
        raise Unauthorized("missing bearer token")
    presented = credentials.credentials.encode()
    valid = False
    for token in state.runtime.settings.api_tokens:
        valid |= hmac.compare_digest(presented, token.encode())
    if not valid:
        raise Unauthorized("invalid bearer token")


def v1_router(**options: Any) -> APIRouter:
    """A router of the `/v1` API: under `/v1` and behind the bearer token. Routers carry their
    own prefix so the matched route's `path_format` is the full template (metrics label)."""
    return APIRouter(prefix="/v1", dependencies=[Depends(require_token)], **options)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
StateDep = Annotated[AppState, Depends(app_state)]
