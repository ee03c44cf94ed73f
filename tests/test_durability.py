"""Acknowledged writes survive `kill -9` of the database, and the engine refuses a MongoDB that
cannot keep them (`billing.store.durability`).

These tests start SecantusDB servers of their own, as `billing dev` starts it: the session's
server (or `MONGODB_URI`) is never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from meter_helpers import usage
from pymongo.errors import PyMongoError

from billing.config import BillingConfig, ConfigError
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.meter_writes import usage_id
from billing.store.meters import Meters
from billing.weeks import iso_week
from starter.embedded import MongoServer, find_binary, free_port

ORGS = 8
CALLERS = 16
UNITS = 7


@contextlib.asynccontextmanager
async def server(data_dir: Path | None = None, *, standalone: bool = False
                 ) -> AsyncIterator[MongoServer]:
    mongo = MongoServer(port=free_port(), data_dir=data_dir, standalone=standalone)
    await mongo.start()
    try:
        yield mongo
    finally:
        await mongo.stop()


def database(mongo: MongoServer, name: str) -> Database:
    return Database(mongo.uri, name, serverSelectionTimeoutMS=2000)


async def test_kill_9_of_the_database_loses_no_acknowledged_usage(
        tmp_path: Path, config: BillingConfig) -> None:
    """16 callers record usage through `Meters.record` (group commit, as `POST /v1/usage`) until
    the server is killed with SIGKILL mid-load; after a restart on the same data, every record
    that was acknowledged is there and the meters count exactly the records that are."""
    name = f"durability_{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    orgs = [f"org-{i}" for i in range(ORGS)]
    acknowledged: list[str] = []
    async with server(tmp_path / "mongo") as mongo:
        db = database(mongo, name)
        await db.ensure_indexes()
        for org in orgs:
            await Accounts(db, config).register(org, now)
        meters = Meters(db, config)

        async def caller(n: int) -> None:
            for i in range(100_000):
                request = usage(orgs[(n + i) % ORGS], f"run-{n}-{i}", units=UNITS)
                try:
                    await meters.record(request, now)
                except PyMongoError:
                    return
                acknowledged.append(usage_id(request))

        callers = [asyncio.create_task(caller(n)) for n in range(CALLERS)]
        while len(acknowledged) < 400:
            await asyncio.sleep(0.01)
        await mongo.kill()
        await asyncio.gather(*callers)
        await db.close()

        await mongo.start()
        db = database(mongo, name)
        stored = {doc["_id"] async for doc in db.usage.find({}, {"_id": 1})}
        lost = [key for key in acknowledged if key not in stored]
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged records are gone"
        used = {doc["org_id"]: doc["used"] async for doc in db.meters.find(
            {"week": iso_week(now)})}
        for org in orgs:
            records = sum(1 for key in stored if key.startswith(f"{org}/"))
            assert used.get(org, 0) == records * UNITS, org
        await db.close()


async def test_the_engine_checks_a_replica_set_with_a_persistent_engine() -> None:
    async with server() as mongo:
        db = database(mongo, "durability_check")
        await db.check_durable()  # SecantusDB advertises a one-node replica set
        await db.close()


async def test_a_standalone_server_is_refused() -> None:
    async with server(standalone=True) as mongo:
        db = database(mongo, "durability_check")
        with pytest.raises(ConfigError, match="standalone"):
            await db.check_durable()
        await db.close()


@pytest.mark.parametrize("command", ["worker", "serve"])
async def test_billing_serve_and_worker_refuse_to_start_on_a_standalone_server(
        command: str) -> None:
    async with server(standalone=True) as mongo:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MONGODB_", "TEMPORAL_", "BILLING_"))}
        env.update(MONGODB_URI=mongo.uri, BILLING_API_TOKEN="t", COLUMNS="300",
                   TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}")
        args = [find_binary("billing"), command] + (
            ["--metrics-port", "0"] if command == "worker" else ["--port", str(free_port())])
        done = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True,
                                       text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "configuration error:" in done.stderr and "standalone" in done.stderr
