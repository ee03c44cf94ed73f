"""More than one process: two `billing serve` and two `billing worker` processes on the same
servers, as a scaled-out deployment runs them.

Usage of one hot organization arrives at both APIs at once, each record also sent again to the
other API, and a redelivery storm of purchases reaches both APIs several times: nothing is lost
or applied twice, and the ledger invariants hold."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from faults import (
    WorkerProcess,
    delete_schedules_of,
    outcomes,
    runtime_on,
    serving,
    wait_until,
    worker_env,
)
from ledger_checks import assert_consistent
from stripe_fake import StripeFake
from stripe_payloads import deliver, event, metadata, new_id, payment_intent
from temporalio.client import Client

from billing.runtime import Runtime
from billing.store.database import Database

PACK = "pack_500k"
PACK_UNITS = 500000
SIGNUP_GRANT = 500
RECORDS = 300
CALLERS = 16


@pytest.fixture
async def deployment(runtime: Runtime, stripe_fake: StripeFake, temporal_client: Client,
                     tmp_path: Path) -> AsyncIterator[tuple[list[httpx.AsyncClient], Runtime]]:
    """Two APIs and two workers on a task queue of their own."""
    engine = runtime_on(runtime, temporal_task_queue=f"billing-scale-{new_id('q')[2:10]}")
    env = worker_env(engine.settings, temporal_client, stripe_api_base=stripe_fake.url)
    workers = [WorkerProcess(env, tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        for worker in workers:
            await worker.start()
        async with serving(env, tmp_path / "api-0.log") as one, \
                serving(env, tmp_path / "api-1.log") as two:
            yield [one, two], engine
    finally:
        for worker in workers:
            await worker.stop()
        await delete_schedules_of(temporal_client, engine.settings.temporal_task_queue)
        await engine.db.close()


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]


async def test_usage_of_one_hot_organization_through_two_apis_counts_each_record_once(
    deployment: tuple[list[httpx.AsyncClient], Runtime], db: Database,
) -> None:
    apis, _ = deployment
    org = new_id("org")
    assert (await apis[0].put(f"/v1/orgs/{org}")).status_code == 201
    rng = random.Random(7)
    units = [rng.randint(1, 50) for _ in range(RECORDS)]
    # every record goes to one API and again to the other, in a shuffled order
    sends = [(i, apis[(i + copy) % 2]) for i in range(RECORDS) for copy in range(2)]
    random.Random(11).shuffle(sends)
    gate = asyncio.Semaphore(CALLERS)
    latencies: list[float] = []

    async def send(i: int, api: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
        async with gate:
            started = time.perf_counter()
            response = await api.post("/v1/usage", json={"org_id": org, "run_id": f"run-{i}",
                                                         "units": units[i]})
            latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        return i, response.json()

    began = time.perf_counter()
    answers = await asyncio.gather(*(send(i, api) for i, api in sends))
    elapsed = time.perf_counter() - began
    print(f"hot organization through 2 APIs: {len(sends)} requests in {elapsed:.1f} s "
          f"({len(sends) / elapsed:.0f}/s), p99 {p99(latencies) * 1000:.0f} ms")

    applied = Counter(i for i, answer in answers if answer["applied"])
    assert applied == Counter(range(RECORDS))  # each record applied exactly once
    first = {i: answer for i, answer in answers if answer["applied"]}
    for i, answer in answers:  # a replay answers the first result
        assert {**answer, "applied": True} == first[i]
    assert sorted(a["used"] for a in first.values()) == sorted(
        {a["used"] for a in first.values()})  # serial: every record saw its own total
    total = sum(units)
    meters = [m async for m in db.meters.find({"org_id": org})]
    assert [m["used"] for m in meters] == [total]
    assert await db.usage.count_documents({"org_id": org}) == RECORDS
    await assert_consistent(db, org)


async def test_a_redelivery_storm_through_two_apis_credits_every_purchase_once(
    deployment: tuple[list[httpx.AsyncClient], Runtime], stripe_fake: StripeFake,
    temporal_client: Client, db: Database,
) -> None:
    apis, _ = deployment
    orgs = [new_id("org") for _ in range(4)]
    for org in orgs:
        assert (await apis[1].put(f"/v1/orgs/{org}")).status_code == 201
    events = []
    for org in orgs:
        for _ in range(15):
            intent = stripe_fake.add(payment_intent(pi=new_id("pi"), meta=metadata(org, PACK),
                                                    charge=new_id("ch")))
            events.append(event("payment_intent.succeeded", intent))
    deliveries = [(evt, api) for evt in events for api in apis for _ in range(2)]
    random.Random(13).shuffle(deliveries)
    gate = asyncio.Semaphore(CALLERS)

    async def send(evt: dict[str, Any], api: httpx.AsyncClient) -> tuple[str, str]:
        async with gate:
            response = await deliver(api, evt)
        assert response.status_code == 200, response.text
        return evt["id"], response.json()["status"]

    acks = await asyncio.gather(*(send(evt, api) for evt, api in deliveries))
    started = Counter(evt_id for evt_id, status in acks if status == "started")
    assert started == Counter(evt["id"] for evt in events)  # one workflow per event
    ids = [evt["id"] for evt in events]

    async def recorded() -> bool:
        return await db.stripe_events.count_documents({"_id": {"$in": ids}}) == len(ids)

    await wait_until(recorded, "every event to be recorded", timeout_s=300, every_s=0.5)
    results = await outcomes(temporal_client, ids)
    assert Counter(r.outcome for r in results.values()) == {"applied": len(ids)}
    for org in orgs:
        account = await db.accounts.find_one({"_id": org})
        assert account is not None and account["balance"] == SIGNUP_GRANT + 15 * PACK_UNITS
        await assert_consistent(db, org)
