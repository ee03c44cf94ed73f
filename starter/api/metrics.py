"""`GET /metrics`, and every HTTP request counted and timed."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.metrics import Info
from temporalio.service import RPCError

from billing.errors import BillingError
from billing.metrics import FAILED_WORKFLOWS, HTTP_REQUEST_SECONDS, HTTP_REQUESTS
from starter.api.deps import StateDep, temporal_client
from starter.operations.failures import list_failed

UNMATCHED = "<unmatched>"
#: The instrumentator's handler for a path that matches no route.
UNTEMPLATED = "none"
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


def _record(info: Info) -> None:
    """Count and time a request under its route template (`/v1/orgs/{org}`), never its raw
    path, so the number of series stays bounded; paths that match no route share one label."""
    route = UNMATCHED if info.modified_handler == UNTEMPLATED else info.modified_handler
    HTTP_REQUESTS.labels(info.method, route, info.modified_status).inc()
    HTTP_REQUEST_SECONDS.labels(info.method, route).observe(info.modified_duration)


def instrument(app: FastAPI) -> None:
    """`prometheus-fastapi-instrumentator` measures every request with the engine's own metrics
    (`billing.metrics`: the names the alerts and the dashboard use); `/metrics` is served by
    `router` above."""
    Instrumentator(should_group_status_codes=False, should_group_untemplated=True,
                   should_ignore_untemplated=False).add(_record).instrument(app)
