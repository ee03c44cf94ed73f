"""Outbound webhooks (SPEC §5.7) on real servers: SecantusDB, the Temporal dev server, the
worker with its outbox dispatcher, and a receiver on 127.0.0.1 that verifies every request with
the Standard Webhooks library."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from faults import WorkerProcess, delete_schedules_of, runtime_on, wait_until, worker_env
from prometheus_client import REGISTRY
from standardwebhooks import Webhook
from temporalio.client import Client, WorkflowExecutionStatus
from webhook_receiver import OLD_SECRET, SECRET, Receiver

from billing.runtime import Runtime
from billing.store import outbox
from billing.store.accounts import Accounts
from billing.store.books import notify
from billing.webhooks import delivery_workflow_id
from starter.embedded import find_binary
from starter.outbox import dispatch_pending
from starter.webhook_dispatch import WebhookStarter, run_webhook_dispatcher
from worker import build_worker
from workflows.search import ORG_ID
from workflows.webhook_delivery import WebhookDeliveryWorkflow

Obj = dict[str, Any]


@pytest.fixture(scope="module")
async def hooks_db_runtime(runtime: Runtime) -> AsyncIterator[Runtime]:
    """A database of this module's own: the dispatcher delivers every pending notification it
    finds, and the other modules' must not reach these receivers."""
    own = runtime_on(runtime, mongodb_db=f"billing_hooks_{uuid.uuid4().hex[:8]}")
    await own.db.ensure_indexes()
    yield own
    await own.db.client.drop_database(own.db.db.name)
    await own.db.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    await hook.start()
    yield hook
    await hook.stop()


def configured(base: Runtime, *urls: str, secrets: str = SECRET,
               budget_s: int = 3 * 24 * 3600) -> Runtime:
    """`base` delivering to `urls` on a task queue of its own (sharing its database client)."""
    settings = base.settings.model_copy(update={
        "temporal_task_queue": f"billing-hooks-{uuid.uuid4().hex[:8]}",
        "billing_webhook_url": ",".join(urls), "billing_webhook_secret": secrets,
        "billing_webhook_budget_seconds": budget_s, "billing_outbox_poll_seconds": 0.1,
    })
    settings.check_webhooks()
    return Runtime(settings=settings, config=base.config, db=base.db)


@asynccontextmanager
async def engine(client: Client, runtime: Runtime, *, dispatcher: bool = True
                 ) -> AsyncIterator[Runtime]:
    """The worker and (unless told otherwise) its dispatcher, as `billing worker` runs them."""
    async with build_worker(client, runtime):
        task = asyncio.create_task(run_webhook_dispatcher(client, runtime)) if dispatcher \
            else None
        try:
            yield runtime
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def billing_cli(client: Client, runtime: Runtime, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `billing` console script, as an operator runs it."""
    env = {**os.environ, "TEMPORAL_ADDRESS": client.service_client.config.target_host,
           "TEMPORAL_NAMESPACE": client.namespace,
           "TEMPORAL_TASK_QUEUE": runtime.settings.temporal_task_queue,
           "MONGODB_URI": runtime.settings.mongodb_uri, "MONGODB_DB": runtime.settings.mongodb_db,
           "BILLING_WEBHOOK_URL": runtime.settings.billing_webhook_url,
           "BILLING_WEBHOOK_SECRET": runtime.settings.billing_webhook_secret}
    return subprocess.run([find_binary("billing"), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


async def new_org(runtime: Runtime) -> str:
    org = f"org-{uuid.uuid4().hex[:12]}"
    await Accounts(runtime.db, runtime.config).register(org, datetime.now(UTC))
    return org


async def write(runtime: Runtime, org: str, n: int) -> None:
    for i in range(n):
        assert await notify(runtime.db, None, org_id=org, type="payment.failed",
                            key=f"payment.failed:evt_{i}", payload={"n": i},
                            now=datetime.now(UTC))


async def arrived(hook: Receiver, org: str, count: int) -> list[Obj]:
    async def enough() -> bool:
        return len({r.body["seq"] for r in hook.of(org)}) >= count

    await wait_until(enough, f"{count} deliveries to {org}")
    return [r.body for r in hook.of(org)]


async def status_of(client: Client, workflow_id: str) -> WorkflowExecutionStatus | None:
    return (await client.get_workflow_handle(workflow_id).describe()).status


async def test_a_notification_arrives_signed_verifiable_and_acknowledged(
    hooks_db_runtime: Runtime, temporal_client: Client, receiver: Receiver
) -> None:
    runtime = configured(hooks_db_runtime, receiver.url, secrets=f"{SECRET},{OLD_SECRET}")
    org = await new_org(runtime)
    async with engine(temporal_client, runtime):
        await write(runtime, org, 1)
        [body] = await arrived(receiver, org, 1)
        handle = temporal_client.get_workflow_handle_for(
            WebhookDeliveryWorkflow.run, delivery_workflow_id(receiver.url, org, 1))
        result = await handle.result()

    [request] = receiver.of(org)
    stored = await runtime.db.notifications.find_one({"org_id": org, "seq": 1})
    assert stored is not None
    assert request.verified and request.webhook_id == str(stored["_id"]) == body["id"]
    assert list(body) == ["id", "type", "org_id", "seq", "created_at", "payload"]
    assert (body["type"], body["org_id"], body["seq"], body["payload"]) == (
        "payment.failed", org, 1, {"n": 0})
    for secret in (SECRET, OLD_SECRET):  # signed with both during a rotation
        assert Webhook(secret).verify(request.raw, request.headers) == body
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert (result.status, result.attempt) == (200, 1)
    # out of the outbox and acknowledged
    assert "dispatch" not in stored and "undelivered" not in stored
    described = await handle.describe()
    assert described.typed_search_attributes.get(ORG_ID) == org


async def test_a_receiver_answering_500_three_times_gets_the_same_webhook_id_four_times(
    hooks_db_runtime: Runtime, temporal_client: Client, receiver: Receiver
) -> None:
    runtime = configured(hooks_db_runtime, receiver.url)
    org = await new_org(runtime)
    receiver.script = [500, 500, 500]
    async with engine(temporal_client, runtime):
        await write(runtime, org, 1)
        handle = temporal_client.get_workflow_handle_for(
            WebhookDeliveryWorkflow.run, delivery_workflow_id(receiver.url, org, 1))
        await wait_until(lambda: _exists(temporal_client, handle.id), "the delivery's start")
        result = await handle.result()
    requests = receiver.of(org)
    assert len(requests) == 4 and all(r.verified for r in requests)
    assert len({r.webhook_id for r in requests}) == 1
    assert (result.status, result.attempt) == (200, 4)


async def _exists(client: Client, workflow_id: str) -> bool:
    from temporalio.service import RPCError

    try:
        await client.get_workflow_handle(workflow_id).describe()
    except RPCError:
        return False
    return True


async def test_a_receiver_down_beyond_the_budget_fails_visibly_and_billing_retry_delivers(
    hooks_db_runtime: Runtime, temporal_client: Client
) -> None:
    down = Receiver()  # not started: nothing listens on its port yet
    runtime = configured(hooks_db_runtime, down.url, budget_s=3)
    org = await new_org(runtime)
    workflow_id = delivery_workflow_id(down.url, org, 1)
    async with engine(temporal_client, runtime):
        await write(runtime, org, 1)

        async def failed() -> bool:
            return await _exists(temporal_client, workflow_id) and \
                await status_of(temporal_client, workflow_id) == WorkflowExecutionStatus.FAILED

        await wait_until(failed, "the delivery to fail")
        await wait_until(lambda: _gauge_positive(), "the oldest-undelivered gauge")
        listed = await asyncio.to_thread(billing_cli, temporal_client, runtime,
                                         "failures", "--org", org, "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert (row["workflow_id"], row["workflow_type"], row["org_id"]) == (
            workflow_id, "WebhookDeliveryWorkflow", org)
        assert row["failure"].startswith(f"WEBHOOK_UNREACHABLE: {down.url}: ConnectError")

        await down.start()
        try:
            retried = await asyncio.to_thread(billing_cli, temporal_client, runtime,
                                              "retry", workflow_id)
            assert retried.returncode == 0, retried.stderr
            result = await temporal_client.get_workflow_handle_for(
                WebhookDeliveryWorkflow.run, workflow_id).result()
        finally:
            await down.stop()
    assert result.status == 200
    [request] = down.of(org)
    assert request.verified and request.body["seq"] == 1
    stored = await runtime.db.notifications.find_one({"org_id": org, "seq": 1})
    assert stored is not None and "undelivered" not in stored


async def _gauge_positive() -> bool:
    return (REGISTRY.get_sample_value("billing_webhook_oldest_undelivered_seconds") or 0) > 0


async def test_500_notifications_across_20_organizations_each_arrive_with_every_seq(
    hooks_db_runtime: Runtime, temporal_client: Client, receiver: Receiver
) -> None:
    runtime = configured(hooks_db_runtime, receiver.url)
    orgs = [await new_org(runtime) for _ in range(20)]
    async with engine(temporal_client, runtime):
        await asyncio.gather(*(write(runtime, org, 25) for org in orgs))
        for org in orgs:
            await arrived(receiver, org, 25)
    for org in orgs:
        assert sorted({r.body["seq"] for r in receiver.of(org)}) == list(range(1, 26))
        assert all(r.verified for r in receiver.of(org))


async def test_a_crash_between_commit_and_start_is_swept_by_the_next_worker(
    hooks_db_runtime: Runtime, temporal_client: Client, receiver: Receiver
) -> None:
    """Committed notifications whose deliveries no process started (the writer died right after
    its commit) are started by the next dispatcher, each once."""
    runtime = configured(hooks_db_runtime, receiver.url)
    org = await new_org(runtime)
    await write(runtime, org, 5)
    pending = await runtime.db.notifications.count_documents({"org_id": org, **outbox.MARK})
    assert pending == 5 and not await _exists(
        temporal_client, delivery_workflow_id(receiver.url, org, 1))
    async with engine(temporal_client, runtime):
        await arrived(receiver, org, 5)
    assert sorted(r.body["seq"] for r in receiver.of(org)) == [1, 2, 3, 4, 5]


async def test_a_crash_between_start_and_clear_starts_nothing_twice(
    hooks_db_runtime: Runtime, temporal_client: Client, receiver: Receiver
) -> None:
    """The dispatcher started a delivery and died before clearing the mark: the next one starts
    the same workflow id, which finds the completed run, and takes the acknowledgement as it is."""
    runtime = configured(hooks_db_runtime, receiver.url)
    org = await new_org(runtime)
    await write(runtime, org, 1)
    doc = await runtime.db.notifications.find_one({"org_id": org, "seq": 1})
    assert doc is not None
    async with engine(temporal_client, runtime, dispatcher=False):
        await WebhookStarter(temporal_client, runtime)(doc)  # started, mark not cleared
        handle = temporal_client.get_workflow_handle_for(
            WebhookDeliveryWorkflow.run, delivery_workflow_id(receiver.url, org, 1))
        await handle.result()
        assert await runtime.db.notifications.count_documents(
            {"_id": doc["_id"], **outbox.MARK}) == 1
        assert await dispatch_pending(runtime.db.notifications,
                                      WebhookStarter(temporal_client, runtime)) >= 1
    stored = await runtime.db.notifications.find_one({"_id": doc["_id"]})
    assert stored is not None and "dispatch" not in stored and "undelivered" not in stored
    assert len(receiver.of(org)) == 1
    runs = [w async for w in temporal_client.list_workflows(f'WorkflowId="{handle.id}"')]
    assert len(runs) == 1


async def test_without_a_receiver_notifications_leave_the_outbox_and_nothing_starts(
    hooks_db_runtime: Runtime, temporal_client: Client
) -> None:
    runtime = configured(hooks_db_runtime)
    org = await new_org(runtime)
    await write(runtime, org, 2)
    assert await dispatch_pending(runtime.db.notifications,
                                  WebhookStarter(temporal_client, runtime)) >= 2
    stored = [doc async for doc in runtime.db.notifications.find({"org_id": org})]
    assert len(stored) == 2 and not any("dispatch" in d or "undelivered" in d for d in stored)
    started = [w async for w in temporal_client.list_workflows(f'OrgId="{org}"')]
    assert started == []


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
    return subprocess.run([find_binary("billing"), *args], env={**clean, "COLUMNS": "200", **env},
                          capture_output=True, text=True, timeout=60, check=False)


async def test_billing_webhooks_test_sends_a_signed_sample_and_says_what_each_answered(
    receiver: Receiver,
) -> None:
    failing = Receiver()
    failing.script = [503]
    await failing.start()
    try:
        env = {"BILLING_WEBHOOK_URL": receiver.url, "BILLING_WEBHOOK_SECRET": SECRET}
        sent = await asyncio.to_thread(cli, "webhooks", "test", "--json", env=env)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout) == [
            {"url": receiver.url, "status": 200, "error": None, "ok": True}]
        [sample] = receiver.received
        assert sample.verified and sample.body["type"] == "webhook.test"
        assert sample.webhook_id == sample.body["id"]

        both = {**env, "BILLING_WEBHOOK_URL": f"{receiver.url},{failing.url}"}
        mixed = await asyncio.to_thread(cli, "webhooks", "test", env=both)
        assert mixed.returncode == 1 and "503" in mixed.stdout and "200" in mixed.stdout
        assert len(failing.received) == 1 and failing.received[0].verified
    finally:
        await failing.stop()
    explicit = await asyncio.to_thread(cli, "webhooks", "test", "--url", receiver.url,
                                       env={"BILLING_WEBHOOK_SECRET": SECRET})
    assert explicit.returncode == 0 and len(receiver.received) == 3
    nowhere = await asyncio.to_thread(cli, "webhooks", "test", env={})
    assert nowhere.returncode == 1 and "no receiver" in nowhere.stderr


@pytest.mark.parametrize("command", [("worker", "--metrics-port", "0"), ("webhooks", "test")])
async def test_a_receiver_without_a_secret_is_a_configuration_error_at_start(
    command: tuple[str, ...],
) -> None:
    started = await asyncio.to_thread(cli, *command, env={
        "BILLING_WEBHOOK_URL": "http://127.0.0.1:9/hooks",
        "MONGODB_URI": "mongodb://127.0.0.1:9/", "TEMPORAL_ADDRESS": "127.0.0.1:9"})
    assert started.returncode == 2
    assert "configuration error" in started.stderr and "BILLING_WEBHOOK_SECRET" in \
        started.stderr


async def test_a_worker_killed_while_dispatching_leaves_nothing_undelivered(
    hooks_db_runtime: Runtime, temporal_client: Client, receiver: Receiver, tmp_path: Path
) -> None:
    """`billing worker` killed (SIGKILL) in the middle of dispatching: some notifications
    started and not cleared, others not started; the next worker delivers every one."""
    runtime = configured(hooks_db_runtime, receiver.url)
    orgs = [await new_org(runtime) for _ in range(4)]
    await asyncio.gather(*(write(runtime, org, 40) for org in orgs))
    env = {**worker_env(runtime.settings, temporal_client),
           "BILLING_WEBHOOK_URL": receiver.url, "BILLING_WEBHOOK_SECRET": SECRET}
    first = WorkerProcess(env, tmp_path / "worker-1.log", "--metrics-port", "0")
    second = WorkerProcess(env, tmp_path / "worker-2.log", "--metrics-port", "0")

    async def some_delivered() -> bool:
        assert first.process is not None and first.process.returncode is None, \
            (tmp_path / "worker-1.log").read_text()
        return len(receiver.received) > 0

    try:
        await first.start()
        await wait_until(some_delivered, "the first delivery", every_s=0.01)
        await first.kill()
        left = await runtime.db.notifications.count_documents(
            {"org_id": {"$in": orgs}, **outbox.MARK})
        await second.start()
        for org in orgs:
            await arrived(receiver, org, 40)
    finally:
        await first.stop()
        await second.stop()
        await delete_schedules_of(temporal_client, runtime.settings.temporal_task_queue)
    print(f"pending at the kill: {left} of 160")
    for org in orgs:
        assert sorted({r.body["seq"] for r in receiver.of(org)}) == list(range(1, 41))
