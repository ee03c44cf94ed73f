"""Operator tooling end to end (issue 5): failures with their root cause, retry by batch reset,
replay through the Stripe API, and the schedules. Retry and replay apply a failed event once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli
from stripe_fake import StripeFake
from stripe_payloads import checkout_session, event, metadata, new_id, payment_intent
from temporal_helpers import started
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError

from billing.errors import InvalidInput
from billing.models import StripeEventOutcome
from billing.runtime import Runtime
from starter.operations.failures import FailedWorkflow, list_failed
from starter.operations.replay import replay_event
from starter.operations.retries import reset_each
from starter.operations.schedule_views import list_schedules
from starter.schedules import SCHEDULES, ensure_schedules

PACK_UNITS = 500000


async def failed_purchase(api: Any, client: Client, stripe_fake: StripeFake,
                          org: str) -> tuple[dict[str, Any], str, WorkflowHandle[Any, Any]]:
    """A paid checkout whose pack is named only by its payment intent, which Stripe does not
    know yet: the read answers 404 and the workflow fails at once (no retry fixes a 404).
    The event itself is retrievable, as Stripe keeps it."""
    pi = new_id("pi")
    session = stripe_fake.checkout(checkout_session(payment_intent=pi, meta=metadata(org)))
    evt = stripe_fake.add(event("checkout.session.completed", session))
    handle = await started(api, evt, client)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    return evt, pi, handle


def fix(stripe_fake: StripeFake, org: str, pi: str) -> None:
    stripe_fake.add(payment_intent(pi=pi, meta=metadata(org, "pack_500k")))


async def wait_failed(client: Client, org: str, task_queue: str,
                      count: int) -> list[FailedWorkflow]:
    """Visibility is eventually consistent: wait until `count` failures are listed."""
    found: list[FailedWorkflow] = []
    for _ in range(100):
        found = await list_failed(client, org=org, task_queue=task_queue)
        if len(found) >= count:
            break
        await asyncio.sleep(0.2)
    return found


async def balance_and_entries(api: Any, org: str) -> tuple[int, list[int]]:
    balance = (await api.get(f"/v1/orgs/{org}/balance")).json()["balance"]
    entries = (await api.get(f"/v1/orgs/{org}/ledger")).json()["entries"]
    return balance, [entry["amount"] for entry in entries]


def billing_subprocess(client: Client, runtime: Runtime, *args: str) -> Any:
    """The installed `billing` console script, as an operator's script would run it."""
    script = Path(sys.executable).parent / "billing"
    env = {**os.environ, "TEMPORAL_ADDRESS": client.service_client.config.target_host,
           "TEMPORAL_NAMESPACE": client.namespace,
           "TEMPORAL_TASK_QUEUE": runtime.settings.temporal_task_queue,
           "MONGODB_URI": runtime.settings.mongodb_uri,
           "MONGODB_DB": runtime.settings.mongodb_db}
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


async def test_retry_all_failed_resets_by_batch_and_applies_each_event_once(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, stripe_fake: StripeFake, org
):
    failures = [await failed_purchase(api, temporal_client, stripe_fake, org) for _ in range(2)]
    task_queue = stripe_runtime.settings.temporal_task_queue
    assert len(await wait_failed(temporal_client, org, task_queue, 2)) == 2

    listed = await asyncio.to_thread(billing_subprocess, temporal_client, stripe_runtime,
                                     "failures", "--org", org, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["workflow_id"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {handle.id for _, _, handle in failures}
    for _, pi, handle in failures:
        row = rows[handle.id]
        assert (row["workflow_type"], row["org_id"], row["event_type"]) == (
            "StripeEventWorkflow", org, "checkout.session.completed")
        assert row["failure"].startswith(f"STRIPE_404: Stripe refused payment intent {pi}")
        assert row["run_id"] == (await handle.describe()).run_id and row["close_time"]
    table = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "failures", "--org", org)
    assert table.exit_code == 0, table.output
    assert "STRIPE_404" in table.output and failures[0][2].id in table.output

    for _, pi, _ in failures:
        fix(stripe_fake, org, pi)
    retried = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                      "retry", "--all-failed", "--org", org)
    assert retried.exit_code == 0, retried.output
    assert "failed workflows: 2, reset: 2, not reset: 0 (batch job" in retried.output
    for _, _, handle in failures:
        result: StripeEventOutcome = await temporal_client.get_workflow_handle(
            handle.id, result_type=StripeEventOutcome).result()
        assert result.outcome == "applied"
    assert await balance_and_entries(api, org) == (2 * PACK_UNITS, [PACK_UNITS, PACK_UNITS])
    assert await list_failed(temporal_client, org=org, task_queue=task_queue) == []

    again = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                    "retry", "--all-failed", "--org", org)
    assert again.exit_code == 0 and "no failed billing workflows" in again.output
    assert await balance_and_entries(api, org) == (2 * PACK_UNITS, [PACK_UNITS, PACK_UNITS])


async def test_replay_applies_a_failed_event_once_and_an_applied_one_as_duplicate(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, stripe_fake: StripeFake, org
):
    evt, pi, handle = await failed_purchase(api, temporal_client, stripe_fake, org)
    task_queue = stripe_runtime.settings.temporal_task_queue

    # Not fixed yet: the replay runs, fails the same way and says why.
    unfixed = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "replay", evt["id"])
    assert unfixed.exit_code == 1
    assert f"stripe-{evt['id']} failed: STRIPE_404" in unfixed.output

    fix(stripe_fake, org, pi)
    replayed = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "replay", evt["id"])
    assert replayed.exit_code == 0, replayed.output
    assert "checkout.session.completed applied" in replayed.output
    assert f"wrote ledger payment:{pi} +{PACK_UNITS}" in replayed.output
    assert stripe_fake.calls[f"/v1/events/{evt['id']}"] == 2
    assert await balance_and_entries(api, org) == (PACK_UNITS, [PACK_UNITS])
    view = (await api.get(f"/v1/stripe-events/{evt['id']}")).json()
    assert (view["status"], view["outcome"], view["org_id"]) == ("COMPLETED", "applied", org)
    # The replay is the latest run: the failure is resolved, and the old run is not retried.
    assert await list_failed(temporal_client, org=org, task_queue=task_queue) == []
    stale = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "retry", handle.id)
    assert stale.exit_code == 1 and "NOT_RETRYABLE" in stale.output

    twice = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                    "replay", evt["id"], "--json")
    assert twice.exit_code == 0, twice.output
    outcome = json.loads(twice.output)["outcome"]
    assert (outcome["outcome"], outcome["written"]) == ("duplicate", [])
    assert await balance_and_entries(api, org) == (PACK_UNITS, [PACK_UNITS])


async def test_replay_refuses_what_is_not_an_event_id(temporal_client, stripe_runtime: Runtime):
    with pytest.raises(InvalidInput):
        await replay_event(temporal_client, "pi_123",
                           task_queue=stripe_runtime.settings.temporal_task_queue)


async def test_without_batch_operations_each_workflow_is_reset(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, stripe_fake: StripeFake, org
):
    _, pi, handle = await failed_purchase(api, temporal_client, stripe_fake, org)
    failed = await wait_failed(temporal_client, org, stripe_runtime.settings.temporal_task_queue, 1)
    fix(stripe_fake, org, pi)
    report = await reset_each(temporal_client, failed, reason="test")
    assert (report.method, report.workflow_ids, report.reset, report.failed) == (
        "per-workflow", [handle.id], 1, 0)
    result = await temporal_client.get_workflow_handle(
        handle.id, result_type=StripeEventOutcome).result()
    assert result.outcome == "applied"
    again = await reset_each(temporal_client, failed, reason="test")  # completed: not reset
    assert (again.reset, again.failed) == (0, 1)
    assert await balance_and_entries(api, org) == (PACK_UNITS, [PACK_UNITS])


async def test_schedules_list_their_next_runs_and_trigger_starts_a_run(
    temporal_client: Client, stripe_runtime: Runtime
):
    # A task queue without a worker: a triggered run starts but does nothing to the test data.
    created = await ensure_schedules(temporal_client, f"billing-schedules-{uuid.uuid4().hex[:8]}")
    started_id: str | None = None
    try:
        listed = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                         "schedules", "--json")
        assert listed.exit_code == 0, listed.output
        views = {view["id"]: view for view in json.loads(listed.output)}
        assert set(views) == {definition.id for definition in SCHEDULES}
        for definition in SCHEDULES:
            view = views[definition.id]
            assert view["exists"] and view["workflow"] == definition.workflow
            assert (view["paused"], view["overlap"]) == (False, "SKIP")
            assert view["next_runs"], view
        assert views["weekly-reset"]["spec"] == "Mon 00:00 UTC"
        assert views["expire-credits"]["spec"] == "daily 00:30 UTC"
        monday = datetime.fromisoformat(views["weekly-reset"]["next_runs"][0]).astimezone(UTC)
        assert (monday.weekday(), monday.hour, monday.minute) == (0, 0, 0)

        triggered = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                            "schedules", "--trigger", "expire-credits", "--json")
        assert triggered.exit_code == 0, triggered.output
        result = json.loads(triggered.output)
        started_id = result["workflow_id"]
        assert result["skipped"] is False and started_id.startswith("expire-credits-")
        run = await temporal_client.get_workflow_handle(started_id).describe()
        assert run.workflow_type == "ExpireCreditsWorkflow"
        after = {v.id: v for v in await list_schedules(temporal_client)}
        assert after["expire-credits"].last_workflow_id == started_id

        table = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "schedules")
        assert table.exit_code == 0 and "Mon 00:00 UTC" in table.output
        unknown = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                          "schedules", "--trigger", "nightly")
        assert unknown.exit_code == 1 and "INVALID_INPUT" in unknown.output
    finally:
        if started_id is not None:
            with contextlib.suppress(RPCError):
                await temporal_client.get_workflow_handle(started_id).terminate("test done")
        for schedule_id in created:
            await temporal_client.get_schedule_handle(schedule_id).delete()
