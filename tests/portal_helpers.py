"""The engine with customer tokens enabled: a runtime with portal keys and its API in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import httpx
import pytest
from temporalio.client import Client

from billing.clock import utcnow
from billing.runtime import Runtime
from billing.tokens import Scope, issue
from starter.api.app import create_app

#: The signing key first, then a key from before a rotation that still verifies.
CURRENT_KEY = "portal-key-current-7f3a9c1e5b2d4f6a8c0e"
PREVIOUS_KEY = "portal-key-previous-1b2c3d4e5f60718293a4"
#: A key rotated out: no longer in `BILLING_PORTAL_SECRET`.
RETIRED_KEY = "portal-key-retired-99887766554433221100"
PORTAL_SECRET = f"{CURRENT_KEY},{PREVIOUS_KEY}"
PUBLIC_URL = "https://billing.example.com"
OPERATOR = {"Authorization": "Bearer test-token"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def portal_runtime(stripe_runtime: Runtime) -> Runtime:
    """The Stripe tests' runtime with customer tokens enabled (same database and client)."""
    settings = stripe_runtime.settings.model_copy(update={
        "billing_portal_secret": PORTAL_SECRET, "billing_public_url": PUBLIC_URL})
    return Runtime(settings=settings, config=stripe_runtime.config, db=stripe_runtime.db)


@pytest.fixture(scope="session")
async def portal_api(portal_runtime: Runtime, temporal_client: Client
                     ) -> AsyncIterator[httpx.AsyncClient]:
    """The app with customer tokens enabled; requests carry no token unless they say."""
    app = create_app(portal_runtime, temporal_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://portal") as client:
        yield client


async def registered(api: httpx.AsyncClient, org: str) -> str:
    response = await api.put(f"/v1/orgs/{org}", headers=OPERATOR)
    assert response.status_code == 201, response.text
    return org


async def customer_token(api: httpx.AsyncClient, org: str, *scopes: Scope,
                         ttl_seconds: int | None = None) -> dict[str, str]:
    """`POST /v1/orgs/{org}/tokens` with the operator token: the 201 answer."""
    body: dict[str, object] = {"scopes": list(scopes or ("read",))}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    response = await api.post(f"/v1/orgs/{org}/tokens", json=body, headers=OPERATOR)
    assert response.status_code == 201, response.text
    answer: dict[str, str] = response.json()
    return answer


async def expired_token(runtime: Runtime, org: str, *scopes: Scope) -> str:
    """A token the engine issued and recorded an hour ago, valid for a minute then."""
    then: datetime = utcnow() - timedelta(hours=1)
    issued = issue(runtime.settings.portal_secrets, org, frozenset(scopes or ("read",)),
                   ttl_seconds=60, now=then)
    await runtime.tokens.record(issued.claims, then)
    return issued.token
