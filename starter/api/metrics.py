"""`GET /metrics` and the middleware that counts and times every HTTP request."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.service import RPCError

from billing.errors import BillingError
from billing.metrics import FAILED_WORKFLOWS, HTTP_REQUEST_SECONDS, HTTP_REQUESTS
from starter.api.deps import StateDep, temporal_client
from starter.operations.failures import list_failed

UNMATCHED = "<unmatched>"
FAILED_COUNT_TIMEOUT_S = 3.0

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    """The engine's metrics, the failed-workflow count from Temporal, and the SDK's metrics."""
    await _count_failed_workflows(state)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _count_failed_workflows(state: StateDep) -> None:
    """Refresh `billing_failed_workflows`; left as it was when Temporal does not answer."""
    try:
        async with asyncio.timeout(FAILED_COUNT_TIMEOUT_S):
            client = await temporal_client(state)
            queue = state.runtime.settings.temporal_task_queue
            failed = await list_failed(client, task_queue=queue)
    except (BillingError, RPCError, TimeoutError):
        return
    FAILED_WORKFLOWS.set(len(failed))


class MetricsMiddleware:
    """Labels requests by route template (`/v1/orgs/{org}`), never by raw path, so the number of
    series stays bounded; paths that match no route share one label."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            template = str(getattr(scope.get("route"), "path_format", UNMATCHED))
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - started)
