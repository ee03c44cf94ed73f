"""Faults a deployment meets, on real processes: a worker killed mid-activity, MongoDB down longer
than the retry budget, transient database errors, Temporal down. Every event lands exactly once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from faults import (
    FailedCommands,
    WorkerProcess,
    app_client,
    delete_schedules_of,
    fail_point,
    failures,
    outcomes,
    runtime_on,
    wait_until,
    worker_env,
)
from ledger_checks import assert_consistent
from stripe_payloads import deliver, event, metadata, new_id, payment_intent, refund
from temporal_helpers import activity_attempts, step_error
from temporalio.api.enums.v1 import PendingWorkflowTaskState
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from billing.runtime import Runtime
from billing.store.database import Database
from starter.embedded import MongoServer, free_port, start_temporal
from starter.operations.failures import list_failed
from starter.operations.retries import retry_all_failed
from worker import build_worker

Obj = dict[str, Any]

PACK = "pack_500k"
PACK_UNITS = 500000


def purchase(org: str, *, pi: str | None = None, ch: str | None = None) -> Obj:
    return event("payment_intent.succeeded", payment_intent(
        pi=pi or new_id("pi"), meta=metadata(org, PACK), charge=ch or new_id("ch")))


def queue(name: str) -> str:
    return f"billing-{name}-{uuid.uuid4().hex[:8]}"


async def deliver_all(api: httpx.AsyncClient, events: list[Obj]) -> Counter[int]:
    responses = await asyncio.gather(*(deliver(api, e) for e in events))
    return Counter(r.status_code for r in responses)


async def ledger_keys(db: Database, orgs: list[str]) -> Counter[str]:
    return Counter([e["key"] async for e in db.ledger.find({"org_id": {"$in": orgs}})])


async def balances(db: Database, orgs: list[str]) -> dict[str, int]:
    return {a["_id"]: a["balance"] async for a in db.accounts.find({"_id": {"$in": orgs}})}


async def started_tasks(client: Client, event_ids: list[str]) -> int:
    """Workflow tasks a worker had started and not finished: the event's step runs inside its
    workflow task as a local activity (Temporal waits out the task's timeout)."""
    count = 0
    for event_id in event_ids:
        description = await client.get_workflow_handle(f"stripe-{event_id}").describe()
        task = description.raw_description.pending_workflow_task
        count += task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_STARTED
    return count


# ---- 1. the worker process killed in the middle of ledger activities ----------------------------


@pytest.mark.slow
async def test_a_worker_killed_mid_activity_and_restarted_applies_every_event_once(
    runtime: Runtime, temporal_client: Client, db: Database, tmp_path: Path
) -> None:
    orgs = [f"org-kill-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    events = [purchase(orgs[i % len(orgs)]) for i in range(60)]
    ids = [e["id"] for e in events]
    engine = runtime_on(runtime, temporal_task_queue=queue("kill"))
    env = worker_env(engine.settings, temporal_client)
    first = WorkerProcess(env, tmp_path / "worker-1.log")
    second = WorkerProcess(env, tmp_path / "worker-2.log")

    async def written() -> int:
        return await db.ledger.count_documents({"org_id": {"$in": orgs}})

    try:
        # Delivered while no worker runs: the workflows wait in the queue for the first worker.
        async with app_client(engine, temporal_client) as api:
            assert await deliver_all(api, events) == {200: len(events)}
        await first.start()
        await wait_until(written, "the first ledger entry", every_s=0.01)
        await first.kill()
        at_kill = await written()
        in_flight = await started_tasks(temporal_client, ids)
        assert at_kill < len(events), "the worker finished before it could be killed"
        assert in_flight > 0, "no event was being applied when the worker was killed"
        print(f"killed with {at_kill} entries written and {in_flight} events being applied")

        await second.start()
        results = await outcomes(temporal_client, ids)
    finally:
        await first.stop()
        await second.stop()
        await delete_schedules_of(temporal_client, engine.settings.temporal_task_queue)
        await engine.db.close()

    # A transaction that committed before its activity could report is found on retry: the
    # workflow says `duplicate`, the record made in that transaction says `applied`.
    kinds = Counter(r.outcome for r in results.values())
    print(kinds)
    assert set(kinds) <= {"applied", "duplicate"} and kinds.total() == len(events)
    recorded = Counter([d["outcome"] async for d in db.stripe_events.find({"_id": {"$in": ids}})])
    assert recorded == {"applied": len(events)}
    pis = [e["data"]["object"]["id"] for e in events]
    assert await ledger_keys(db, orgs) == Counter(f"payment:{pi}" for pi in pis)
    per_org = len(events) // len(orgs)
    assert await balances(db, orgs) == {org: per_org * PACK_UNITS for org in orgs}
    for org in orgs:
        await assert_consistent(db, org)


# ---- 2. MongoDB down for longer than the retry budget ------------------------------------------


async def test_mongodb_down_beyond_the_retry_budget_fails_visibly_and_retry_all_applies_once(
    runtime: Runtime, temporal_client: Client, tmp_path: Path
) -> None:
    """A MongoDB server of its own (data kept in `tmp_path` across the stop), so the suite's
    server stays up. Each attempt gives up after the 1 s server selection timeout, so the budget
    is five attempts and Temporal's backoff between them (1 + 2 + 4 + 8 s)."""
    server = MongoServer(port=free_port(), data_dir=tmp_path / "mongo")
    await server.start()
    engine = runtime_on(runtime, mongodb_uri=server.uri, mongodb_db="billing_outage",
                        temporal_task_queue=queue("outage"),
                        client_options={"serverSelectionTimeoutMS": 1000})
    task_queue = engine.settings.temporal_task_queue
    org, other = f"org-outage-{uuid.uuid4().hex[:8]}", f"org-outage-{uuid.uuid4().hex[:8]}"
    pi0, ch0 = new_id("pi"), new_id("ch")
    before = purchase(org, pi=pi0, ch=ch0)
    during = [purchase(org), purchase(other),
              event("refund.created", refund(charge=ch0, pi=pi0, amount=4900))]
    ids = [e["id"] for e in during]
    try:
        async with app_client(engine, temporal_client) as api, \
                build_worker(temporal_client, engine):
            assert await deliver_all(api, [before]) == {200: 1}
            assert (await outcomes(temporal_client, [before["id"]]))[before["id"]].outcome \
                == "applied"

            await server.stop()
            stopped = time.monotonic()
            # The webhook needs Temporal only: Stripe's deliveries are accepted during the outage.
            assert await deliver_all(api, during) == {200: len(during)}
            failed = await failures(temporal_client, ids)
            assert set(failed) == set(ids)
            for event_id, failure in failed.items():
                step_error(failure.cause)  # the step that met the outage failed the run
                handle = temporal_client.get_workflow_handle(f"stripe-{event_id}")
                attempts = await activity_attempts(handle)
                assert max(attempts.values()) == 5  # the activity that met the outage
            await server.start()
            print(f"MongoDB was down {time.monotonic() - stopped:.1f} s")

            # Nothing of the failed events was written; what came before survived the restart.
            store = engine.db
            assert await store.stripe_events.count_documents({"_id": {"$in": ids}}) == 0
            assert await ledger_keys(store, [org, other]) == {f"payment:{pi0}": 1}
            assert await balances(store, [org, other]) == {org: PACK_UNITS}

            async def all_listed() -> bool:
                listed = await list_failed(temporal_client, task_queue=task_queue)
                return {f.workflow_id for f in listed} == {f"stripe-{e}" for e in ids}

            await wait_until(all_listed, "the failures to be listed")
            retried = await retry_all_failed(temporal_client, task_queue=task_queue)
            assert sorted(retried.workflow_ids) == sorted(f"stripe-{e}" for e in ids)
            assert (retried.reset, retried.failed) == (len(ids), 0)
            results = await outcomes(temporal_client, ids)
            assert {r.outcome for r in results.values()} == {"applied"}
            again = await retry_all_failed(temporal_client, task_queue=task_queue)
            assert again.workflow_ids == []

            keys = await ledger_keys(store, [org, other])
            assert keys == Counter([f"payment:{pi0}", f"refund:{during[2]['data']['object']['id']}",
                                    *(f"payment:{e['data']['object']['id']}" for e in during[:2])])
            assert await balances(store, [org, other]) == {org: PACK_UNITS, other: PACK_UNITS}
            for each in (org, other):
                await assert_consistent(store, each)
    finally:
        await engine.db.close()
        await server.stop()


# ---- 3. transient database errors injected with fail points ------------------------------------

#: The engine's client in these tests names itself, so only its commands meet the fail points.
FAULT_APP = "billing-fault-tests"

FAULTS: dict[str, dict[str, Any]] = {
    "write-conflicts": {"commands": ["findAndModify", "insert"], "times": 3, "error_code": 112,
                        "error_labels": ["TransientTransactionError"]},
    "dropped-connections": {"commands": ["findAndModify", "insert"], "times": 2,
                            "close_connection": True},
    "dropped-commit": {"commands": ["commitTransaction"], "times": 1, "close_connection": True},
}


@dataclass
class Faulty:
    """The engine (app and in-process worker) on a MongoDB client named `FAULT_APP`, and the
    commands that client saw fail."""

    api: httpx.AsyncClient
    seen: FailedCommands


@pytest.fixture(scope="module")
async def faulty(runtime: Runtime, temporal_client: Client) -> AsyncIterator[Faulty]:
    seen = FailedCommands()
    engine = runtime_on(runtime, temporal_task_queue=queue("faults"),
                        client_options={"appname": FAULT_APP, "event_listeners": [seen]})
    try:
        async with app_client(engine, temporal_client) as api, \
                build_worker(temporal_client, engine):
            yield Faulty(api, seen)
    finally:
        await engine.db.close()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_transient_errors_on_a_usage_record_are_absorbed_and_counted_once(
    faulty: Faulty, db: Database, org: str, fault: str
) -> None:
    api = faulty.api
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    usage = {"org_id": org, "run_id": "run-1", "costs": {"llm": 0.25}}  # 250 units, all overflow
    faulty.seen.counts.clear()
    async with fail_point(db, app_name=FAULT_APP, **FAULTS[fault]):
        response = await api.post("/v1/usage", json=usage)
    assert response.status_code == 200, response.text
    first = response.json()
    assert faulty.seen.counts.total() == FAULTS[fault]["times"], faulty.seen.counts
    assert (first["applied"], first["units"], first["overflow"], first["used"],
            first["balance"]) == (True, 250, 250, 250, 250)

    replay = (await api.post("/v1/usage", json=usage)).json()
    assert replay == {**first, "applied": False}
    assert await ledger_keys(db, [org]) == {"grant:signup": 1, "usage:run-1:initial": 1}
    assert await db.usage.count_documents({"org_id": org}) == 1
    assert [m["used"] async for m in db.meters.find({"org_id": org})] == [250]
    await assert_consistent(db, org)


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_transient_errors_on_a_stripe_event_are_absorbed_and_credited_once(
    faulty: Faulty, db: Database, temporal_client: Client, org: str, fault: str
) -> None:
    evt = purchase(org)
    faulty.seen.counts.clear()
    async with fail_point(db, app_name=FAULT_APP, **FAULTS[fault]):
        assert await deliver_all(faulty.api, [evt]) == {200: 1}
        result = (await outcomes(temporal_client, [evt["id"]]))[evt["id"]]
    assert faulty.seen.counts.total() == FAULTS[fault]["times"], faulty.seen.counts
    assert result.outcome == "applied"
    # Absorbed inside the activity's transaction: Temporal never needed a second attempt.
    handle = temporal_client.get_workflow_handle(f"stripe-{evt['id']}")
    assert (await activity_attempts(handle))["read_and_apply_stripe_purchase"] == 1
    assert await ledger_keys(db, [org]) == {f"payment:{evt['data']['object']['id']}": 1}
    assert await balances(db, [org]) == {org: PACK_UNITS}
    await assert_consistent(db, org)


# ---- 4. Temporal down ----------------------------------------------------------------------------


async def test_temporal_down_answers_503_and_the_same_deliveries_succeed_once_it_is_back(
    runtime: Runtime, db: Database, tmp_path: Path
) -> None:
    """A Temporal dev server of its own, its state in a file so it survives the restart."""
    port = free_port()
    state = tmp_path / "temporal.db"
    engine = runtime_on(runtime, temporal_address=f"127.0.0.1:{port}",
                        temporal_task_queue=queue("temporal-down"))
    org = f"org-temporal-{uuid.uuid4().hex[:8]}"
    first, later = purchase(org), [purchase(org), purchase(org)]
    later_ids = [e["id"] for e in later]
    server = await start_temporal(port=port, database_file=state)

    async def assert_refused(api: httpx.AsyncClient, events: list[Obj]) -> None:
        refused = await asyncio.gather(*(deliver(api, e) for e in events))
        assert [r.status_code for r in refused] == [503] * len(events)
        assert {r.json()["error"]["code"] for r in refused} == {"TEMPORAL_UNAVAILABLE"}

    def client_of(env: WorkflowEnvironment) -> Client:
        return Client(env.client.service_client, namespace=engine.settings.temporal_namespace,
                      data_converter=pydantic_data_converter)

    try:
        # The app connects to TEMPORAL_ADDRESS itself, as `billing serve` does.
        async with app_client(engine, None) as api:
            client = client_of(server)
            async with build_worker(client, engine):
                assert await deliver_all(api, [first]) == {200: 1}
                assert (await outcomes(client, [first["id"]]))[first["id"]].outcome == "applied"
            await server.shutdown()

            await assert_refused(api, later)  # connected before the outage
            async with app_client(engine, None) as fresh:  # never reached Temporal
                await assert_refused(fresh, later)
            assert await db.stripe_events.count_documents({"_id": {"$in": later_ids}}) == 0

            server = await start_temporal(port=port, database_file=state)
            client = client_of(server)
            with pytest.raises(RPCError) as missing:  # the refused deliveries started nothing
                await client.get_workflow_handle(f"stripe-{later_ids[0]}").describe()
            assert missing.value.status == RPCStatusCode.NOT_FOUND
            async with build_worker(client, engine):
                again = await asyncio.gather(*(deliver(api, e) for e in [*later, first]))
                assert [(r.status_code, r.json()["status"]) for r in again] == [
                    (200, "started"), (200, "started"), (200, "duplicate")]
                results = await outcomes(client, later_ids)
    finally:
        await server.shutdown()
        await engine.db.close()

    assert {r.outcome for r in results.values()} == {"applied"}
    pis = [e["data"]["object"]["id"] for e in [first, *later]]
    assert await ledger_keys(db, [org]) == Counter(f"payment:{pi}" for pi in pis)
    assert await balances(db, [org]) == {org: 3 * PACK_UNITS}
    await assert_consistent(db, org)
