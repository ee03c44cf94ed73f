"""The Stripe fake of `starter.stripe_fake` on 127.0.0.1 and the fixtures that run the engine
against it. `conftest.py` shares its fixtures with every test module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from temporalio.client import Client
from temporalio.worker import Worker

from billing.config import BillingConfig
from billing.runtime import Runtime
from billing.store.database import Database
from starter.api.app import create_app
from starter.embedded import free_port
from starter.stripe_fake import StripeFake, line_item
from worker import build_worker

__all__ = ["APP_NAME", "StripeFake", "api", "line_item", "new_fake", "stripe_fake",
           "stripe_runtime", "stripe_worker"]


def new_fake(config: BillingConfig) -> StripeFake:
    """A fake on a free port that sells the configured packs and plans at their prices."""
    fake = StripeFake(free_port())
    fake.sell(config)
    return fake


@pytest.fixture(scope="session")
async def stripe_fake(config: BillingConfig) -> AsyncIterator[StripeFake]:
    fake = new_fake(config)
    await fake.start()
    yield fake
    await fake.stop()

#: The engine's MongoDB client names itself so a `failCommand` fail point can target it alone.
APP_NAME = "billing-stripe-tests"


@pytest.fixture(scope="session")
async def stripe_runtime(runtime: Runtime, stripe_fake: StripeFake) -> AsyncIterator[Runtime]:
    """The session's runtime with the Stripe API at the fake, on a task queue of its own."""
    settings = runtime.settings.model_copy(update={
        "stripe_api_base": stripe_fake.url,
        "temporal_task_queue": f"billing-stripe-{uuid.uuid4().hex[:8]}",
    })
    db = Database(settings.mongodb_uri, settings.mongodb_db, appname=APP_NAME)
    yield Runtime(settings=settings, config=runtime.config, db=db)
    await db.close()


@pytest.fixture(scope="session")
async def stripe_worker(temporal_client: Client, stripe_runtime: Runtime) -> AsyncIterator[Worker]:
    """The real worker (every workflow and activity) on that task queue."""
    async with build_worker(temporal_client, stripe_runtime) as running:
        yield running


@pytest.fixture(scope="session")
async def api(stripe_runtime: Runtime, temporal_client: Client) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app in process: `POST /stripe/webhook` and the `/v1` reads."""
    app = create_app(stripe_runtime, temporal_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                 headers={"Authorization": "Bearer test-token"}) as client:
        yield client
