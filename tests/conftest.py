"""Shared fixtures: a real SecantusDB server and a real Temporal dev server for the session.

Set `MONGODB_URI` or `TEMPORAL_ADDRESS` to run against servers you started yourself.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from meter_helpers import meter_config
from portal_helpers import portal_api, portal_runtime
from stripe_fake import StripeFake, api, stripe_fake, stripe_runtime, stripe_worker
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker
from victims import victim

from billing.config import BillingConfig, Settings, load_config
from billing.runtime import Runtime
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.ledger import Ledger
from starter.embedded import MongoServer, free_port, start_temporal
from worker import build_worker

#: Fixtures of the helper modules, for every test module: the Stripe fake and the engine running
#: against it, the metering configuration, the organization hostile requests aim at, and the
#: engine with customer tokens enabled.
__all__ = ["api", "meter_config", "portal_api", "portal_runtime", "stripe_fake", "stripe_runtime",
           "stripe_worker", "victim"]


@pytest.fixture(scope="session")
def config() -> BillingConfig:
    from billing.config import EXAMPLE_CONFIG

    return load_config(EXAMPLE_CONFIG)


@pytest.fixture(scope="session")
async def mongo_server() -> AsyncIterator[MongoServer | None]:
    """The SecantusDB process the suite started, or None when `MONGODB_URI` names a server."""
    if os.environ.get("MONGODB_URI"):
        yield None
        return
    server = MongoServer(port=free_port(), test_commands=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def mongo_uri(mongo_server: MongoServer | None) -> str:
    return mongo_server.uri if mongo_server is not None else os.environ["MONGODB_URI"]


@contextlib.asynccontextmanager
async def new_database(mongo_uri: str) -> AsyncIterator[Database]:
    """A database of its own, with the engine's indexes, dropped afterwards."""
    database = Database(mongo_uri, f"billing_test_{uuid.uuid4().hex[:8]}")
    await database.ensure_indexes()
    try:
        yield database
    finally:
        await database.client.drop_database(database.db.name)
        await database.close()


@pytest.fixture(scope="session")
async def db(mongo_uri: str) -> AsyncIterator[Database]:
    async with new_database(mongo_uri) as database:
        yield database


@pytest.fixture
async def fresh_db(mongo_uri: str) -> AsyncIterator[Database]:
    """An empty database for one test, for state the session's `db` shares across tests."""
    async with new_database(mongo_uri) as database:
        yield database


@pytest.fixture(scope="session")
async def temporal_client() -> AsyncIterator[Client]:
    address = os.environ.get("TEMPORAL_ADDRESS")
    namespace = os.environ.get("TEMPORAL_NAMESPACE", "default")
    if address:
        yield await Client.connect(address, namespace=namespace,
                                   data_converter=pydantic_data_converter)
        return
    env = await start_temporal(port=free_port())
    yield Client(env.client.service_client, namespace=namespace,
                 data_converter=pydantic_data_converter)
    await env.shutdown()


@pytest.fixture(scope="session")
def settings(mongo_uri: str, db: Database, stripe_fake: StripeFake) -> Settings:
    """Every engine the tests run reads Stripe at the local fake: no test reaches the internet."""
    return Settings(
        stripe_api_base=stripe_fake.url,
        mongodb_uri=mongo_uri,
        mongodb_db=db.db.name,
        temporal_task_queue=f"billing-test-{uuid.uuid4().hex[:8]}",
        stripe_webhook_secret="whsec_test_primary,whsec_test_rotated",
        stripe_api_key="sk_test_billing",
        billing_api_token="test-token",
    )


@pytest.fixture(scope="session")
def runtime(settings: Settings, config: BillingConfig, db: Database) -> Runtime:
    """The engine's runtime on the test database (shares the session's client)."""
    return Runtime(settings=settings, config=config, db=db)


@pytest.fixture(scope="session")
async def worker(temporal_client: Client, runtime: Runtime) -> AsyncIterator[Worker]:
    """The real worker, every workflow and activity registered, on the session's task queue."""
    w = build_worker(temporal_client, runtime)
    async with w:
        yield w


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`RECORD_HISTORIES=1` records the workflow histories of the whole run: last."""
    if os.environ.get("RECORD_HISTORIES"):
        items.sort(key=lambda item: item.name == "test_record_histories")


@pytest.fixture
def org() -> str:
    """A fresh organization id per test, so tests never share ledger state."""
    return f"org-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ledger(db: Database) -> Ledger:
    return Ledger(db)


@pytest.fixture
def accounts(db: Database, config: BillingConfig) -> Accounts:
    return Accounts(db, config)


@pytest.fixture
def now() -> Iterator[datetime]:
    yield datetime(2026, 5, 6, 12, 0, tzinfo=UTC)
