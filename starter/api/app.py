"""The ASGI app: Stripe webhook receiver, the `/v1` API and health endpoints (SPEC §7)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from temporalio.client import Client

from billing.runtime import Runtime
from starter import tracing
from starter.api import (
    auto_topup,
    checkout,
    events,
    health,
    holds,
    metering,
    metrics,
    orgs,
    portal,
    tokens,
    webhook,
)
from starter.api.deps import AppState
from starter.api.errors import install_error_handlers
from starter.api.limits import BodyLimitMiddleware


def create_app(runtime: Runtime, temporal: Client | None = None) -> FastAPI:
    """One app per process. `temporal`, when given, is used as is; otherwise the app connects to
    `TEMPORAL_ADDRESS` on first use (see `deps.temporal_client`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.db.ensure_indexes()
        yield
        tracing.flush()

    app = FastAPI(
        title="Billing engine",
        summary="Weekly plan quotas, prepaid credit packs and Stripe events on Temporal",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.billing = AppState(runtime=runtime, temporal=temporal)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    metrics.instrument(app)

    # One line per router; `/v1` routers come from `deps.v1_router` (prefix and bearer token).
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(orgs.router)
    app.include_router(metering.router)
    app.include_router(holds.router)
    app.include_router(webhook.router)
    app.include_router(events.router)
    app.include_router(auto_topup.router)
    app.include_router(checkout.router)
    app.include_router(tokens.router)
    app.include_router(portal.router)
    tracing.instrument_app(app)
    return app
