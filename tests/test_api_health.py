"""Health, readiness and metrics endpoints, the OpenAPI docs, and the app-wide error format."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from temporalio.client import Client

from billing.config import BillingConfig
from billing.errors import BillingError
from billing.runtime import Runtime
from billing.store.database import Database
from starter.api.app import create_app
from starter.api.deps import AppState, temporal_client
from starter.embedded import free_port
from starter.temporal_client import TemporalUnavailable

AUTH = {"Authorization": "Bearer test-token"}


@asynccontextmanager
async def http(app: FastAPI, *, raise_app_exceptions: bool = True) -> AsyncIterator[AsyncClient]:
    transport = ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def with_settings(runtime: Runtime, **changes: str) -> Runtime:
    return Runtime(settings=runtime.settings.model_copy(update=changes), config=runtime.config,
                   db=runtime.db)


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_healthz(runtime: Runtime) -> None:
    async with http(create_app(runtime)) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_with_mongodb_and_temporal_up(
    runtime: Runtime, temporal_client: Client
) -> None:
    async with http(create_app(runtime, temporal=temporal_client)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"mongodb": "ok", "temporal": "ok"}}


async def test_readyz_connects_to_temporal_lazily(
    runtime: Runtime, temporal_client: Client
) -> None:
    address = temporal_client.service_client.config.target_host
    app = create_app(with_settings(runtime, temporal_address=address))
    state: AppState = app.state.billing
    assert state.temporal is None
    async with http(app) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert state.temporal is not None
    assert await temporal_client.service_client.check_health()


async def test_readyz_503_when_temporal_is_unreachable(runtime: Runtime) -> None:
    address = closed_address()
    async with http(create_app(with_settings(runtime, temporal_address=address))) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "NOT_READY"
    assert "temporal" in error["message"] and "mongodb" not in error["message"]


async def test_readyz_503_names_both_when_both_are_down(config: BillingConfig,
                                                        runtime: Runtime) -> None:
    dead_db = Database(f"mongodb://{closed_address()}/?directConnection=true", "billing_down",
                       serverSelectionTimeoutMS=300)
    dead = Runtime(settings=runtime.settings.model_copy(update={"temporal_address":
                                                                closed_address()}),
                   config=config, db=dead_db)
    try:
        async with http(create_app(dead)) as client:
            response = await client.get("/readyz")
    finally:
        await dead_db.close()
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "mongodb" in message and "temporal" in message
    assert "billing_down" not in message


async def test_temporal_client_raises_503_and_retries_later(runtime: Runtime) -> None:
    state = AppState(runtime=with_settings(runtime, temporal_address=closed_address()))
    for _ in range(2):
        with pytest.raises(TemporalUnavailable) as raised:
            await temporal_client(state)
        assert raised.value.status == 503 and raised.value.code == "TEMPORAL_UNAVAILABLE"
    assert state.temporal is None


async def test_metrics_count_requests_by_route_template(runtime: Runtime, org: str) -> None:
    async with http(create_app(runtime)) as client:
        await client.get("/healthz")
        await client.get(f"/v1/orgs/{org}/balance", headers=AUTH)
        await client.get(f"/no/such/{org}")
        too_big = await client.post("/stripe/webhook", content=b"x" * (1024 * 1024 + 1))
        response = await client.get("/metrics")
    assert too_big.status_code == 413
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE billing_http_requests_total counter" in text
    assert "# TYPE billing_http_request_duration_seconds histogram" in text
    assert 'route="/healthz",status="200"' in text
    assert 'route="/v1/orgs/{org}/balance",status="404"' in text
    assert 'route="<unmatched>",status="404"' in text
    assert 'route="/stripe/webhook",status="413"' in text  # refused before the app
    assert org not in text


async def test_unknown_route_and_wrong_method_use_the_error_format(runtime: Runtime) -> None:
    async with http(create_app(runtime)) as client:
        missing = await client.get("/v2/nothing", headers=AUTH)
        wrong = await client.delete("/healthz")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "NOT_FOUND",
                                        "message": "no route for GET /v2/nothing"}}
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in wrong.headers["allow"]


async def test_unexpected_error_is_500_without_details_and_logged(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(runtime)

    async def broken() -> None:
        raise RuntimeError("boom with sk_live_secret")

    async def refused() -> None:
        raise BillingError("nope", code="SOMETHING_ELSE")

    app.add_api_route("/broken", broken)
    app.add_api_route("/refused", refused)
    with caplog.at_level(logging.ERROR, logger="starter.api.errors"):
        async with http(app, raise_app_exceptions=False) as client:
            response = await client.get("/broken")
            refused_response = await client.get("/refused")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "INTERNAL", "message": "internal error"}}
    assert "sk_live_secret" not in response.text and "Traceback" not in response.text
    assert any(record.exc_info and "sk_live_secret" in str(record.exc_info[1])
               for record in caplog.records)
    assert refused_response.status_code == 400
    assert refused_response.json() == {"error": {"code": "SOMETHING_ELSE", "message": "nope"}}


async def test_openapi_documents_the_api(runtime: Runtime) -> None:
    async with http(create_app(runtime)) as client:
        docs = await client.get("/docs")
        schema = (await client.get("/openapi.json")).json()
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = schema["paths"]
    for path in ("/v1/orgs/{org}", "/v1/orgs/{org}/balance", "/v1/orgs/{org}/ledger",
                 "/healthz", "/readyz", "/metrics"):
        assert path in paths
    assert {"201", "200"} <= set(paths["/v1/orgs/{org}"]["put"]["responses"])
    assert paths["/v1/orgs/{org}/balance"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in paths["/healthz"]["get"]
    components = schema["components"]["schemas"]
    assert {"Balance", "Lot", "LedgerPage", "Entry", "Registration", "ErrorResponse"} <= set(
        components
    )
    limit = next(p for p in paths["/v1/orgs/{org}/ledger"]["get"]["parameters"]
                 if p["name"] == "limit")
    assert limit["schema"]["minimum"] == 1 and limit["schema"]["maximum"] == 200


async def test_metrics_count_committed_ledger_entries_once(runtime, org, now) -> None:
    """A ledger write counts once, after its commit; a replay of its key counts nothing."""
    from prometheus_client import REGISTRY

    from billing.ledger import EntryKind

    def written() -> float:
        sample = REGISTRY.get_sample_value("billing_ledger_entries_total", {"kind": "adjustment"})
        return sample or 0.0

    await runtime.accounts.register(org, now)
    before = written()
    await runtime.ledger.write(org, key="admin:m1", kind=EntryKind.ADJUSTMENT, amount=5, now=now)
    await runtime.ledger.write(org, key="admin:m1", kind=EntryKind.ADJUSTMENT, amount=5, now=now)
    assert written() - before == 1
