"""Request dependencies: the runtime, the Temporal client and bearer-token auth."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from temporalio.client import Client

from billing.errors import BillingError
from billing.runtime import Runtime


class Unauthorized(BillingError):
    status = 401
    code = "UNAUTHORIZED"


class TemporalUnavailable(BillingError):
    status = 503
    code = "TEMPORAL_UNAVAILABLE"


@dataclass
class AppState:
    """What the app holds for its lifetime; the Temporal client is connected lazily."""

    runtime: Runtime
    temporal: Client | None = None
    extras: dict[str, object] = field(default_factory=dict)


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


RuntimeDep = Annotated[Runtime, Depends(runtime)]
StateDep = Annotated[AppState, Depends(app_state)]
