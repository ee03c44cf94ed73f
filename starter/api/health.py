"""`GET /healthz` (the process answers) and `GET /readyz` (MongoDB and Temporal answer)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from billing.errors import BillingError
from starter.api.deps import AppState, StateDep, temporal_client
from starter.api.errors import ErrorResponse, error_response

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok"] = "ok"
    checks: dict[str, str]


async def _mongodb(state: AppState) -> None:
    await state.runtime.db.ping()


async def _temporal(state: AppState) -> None:
    client = await temporal_client(state)
    healthy = await client.service_client.check_health(
        timeout=timedelta(seconds=CHECK_TIMEOUT_S)
    )
    if not healthy:
        raise RuntimeError("health check answered not serving")


PROBES: dict[str, Callable[[AppState], Awaitable[None]]] = {
    "mongodb": _mongodb,
    "temporal": _temporal,
}


async def _failure(probe: Callable[[AppState], Awaitable[None]], state: AppState) -> str | None:
    """None when the probe passed, else a short reason (details go to the log, not the body)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await probe(state)
    except BillingError as exc:
        return exc.message
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:
        logger.warning("readiness probe %s failed: %r", probe.__name__, exc)
        return type(exc).__name__
    return None


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: MongoDB and Temporal reachable",
    responses={503: {"model": ErrorResponse, "description": "a dependency is unreachable"}},
)
async def readyz(state: StateDep) -> Readiness | JSONResponse:
    results = await asyncio.gather(*(_failure(probe, state) for probe in PROBES.values()))
    failed = {name: why for name, why in zip(PROBES, results, strict=True) if why is not None}
    if failed:
        detail = "; ".join(f"{name}: {why}" for name, why in failed.items())
        return error_response(503, "NOT_READY", f"not ready: {detail}")
    return Readiness(checks=dict.fromkeys(PROBES, "ok"))
