"""Failures stay visible (SPEC §6): five attempts, a FAILED workflow findable by `OrgId`, and a
retry that applies the event exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from cli_helpers import cli
from stripe_fake import APP_NAME, StripeFake
from stripe_payloads import (
    checkout_session,
    event,
    invoice,
    metadata,
    new_id,
    payment_intent,
    subscription,
)
from temporal_helpers import activity_attempts, failed_ids, started, step_error
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError

from billing.models import StripeEventOutcome
from billing.runtime import Runtime
from billing.store.database import Database
from starter.operations.failures import list_failed
from starter.operations.retries import retry_all_failed


@asynccontextmanager
async def failing_inserts(db: Database) -> AsyncIterator[None]:
    """Every `insert` of the engine's MongoDB client fails (not the test's own client)."""
    await db.client.admin.command({
        "configureFailPoint": "failCommand", "mode": "alwaysOn",
        "data": {"failCommands": ["insert"], "errorCode": 2, "appName": APP_NAME},
    })
    try:
        yield
    finally:
        await db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


async def test_a_failing_transaction_fails_after_five_attempts_and_retry_applies_once(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, db, org
):
    evt = event("payment_intent.succeeded", payment_intent(pi=new_id("pi"),
                                                           meta=metadata(org, "pack_500k")))
    async with failing_inserts(db):
        handle = await started(api, evt, temporal_client)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert "failCommand" in step_error(failure.value.cause).message
    assert (await activity_attempts(handle))["read_and_apply_stripe_purchase"] == 5
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
    # The failed transaction left nothing behind: no account, no record, no entry.
    assert await db.accounts.find_one({"_id": org}) is None
    assert await db.stripe_events.find_one({"_id": evt["id"]}) is None
    view = (await api.get(f"/v1/stripe-events/{evt['id']}")).json()
    assert (view["status"], view["outcome"], view["org_id"]) == ("FAILED", None, org)

    task_queue = stripe_runtime.settings.temporal_task_queue
    assert await failed_ids(temporal_client, org, task_queue) == {handle.id}
    listed = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                     "failures", "--org", org, "--json")
    assert listed.exit_code == 0, listed.output
    assert [f["workflow_id"] for f in json.loads(listed.output)] == [handle.id]

    retried = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "retry", handle.id)
    assert retried.exit_code == 0, retried.output
    result: StripeEventOutcome = await temporal_client.get_workflow_handle(
        handle.id, result_type=StripeEventOutcome).result()
    assert result.outcome == "applied"
    assert (await api.get(f"/v1/orgs/{org}/balance")).json()["balance"] == 500000
    entries = (await api.get(f"/v1/orgs/{org}/ledger")).json()["entries"]
    assert [e["amount"] for e in entries] == [500000]
    assert await list_failed(temporal_client, org=org, task_queue=task_queue) == []
    again = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "retry", handle.id)
    assert again.exit_code == 1  # completed now: nothing to retry


async def test_stripe_answering_500_fails_after_five_calls_and_retry_all_applies(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, stripe_fake: StripeFake, org
):
    sub, cus = new_id("sub"), new_id("cus")
    session = checkout_session(payment_intent=None, meta=metadata(org), mode="subscription",
                               customer=cus, subscription=sub)
    evt = event("checkout.session.completed", session)
    stripe_fake.fail_with = 500
    try:
        handle = await started(api, evt, temporal_client)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    finally:
        stripe_fake.fail_with = None
    assert stripe_fake.calls[f"/v1/subscriptions/{sub}"] == 5
    task_queue = stripe_runtime.settings.temporal_task_queue
    assert await failed_ids(temporal_client, org, task_queue) == {handle.id}

    stripe_fake.add(subscription(sub=sub, customer=cus, price="price_pro_monthly"))
    retried = await retry_all_failed(temporal_client, org=org, task_queue=task_queue)
    assert (retried.workflow_ids, retried.reset, retried.failed) == ([handle.id], 1, 0)
    result: StripeEventOutcome = await temporal_client.get_workflow_handle(
        handle.id, result_type=StripeEventOutcome).result()
    assert result.outcome == "applied"
    view = (await api.get(f"/v1/orgs/{org}/subscription")).json()
    assert (view["status"], view["plan_id"]) == ("active", "pro")
    assert view["stripe_subscription_id"] == sub


async def test_a_missing_stripe_object_is_not_retried(
    api, stripe_worker, temporal_client, stripe_fake: StripeFake, org
):
    sub = new_id("sub")
    session = checkout_session(payment_intent=None, meta=metadata(org), mode="subscription",
                               customer=new_id("cus"), subscription=sub)
    handle = await started(api, event("checkout.session.completed", session), temporal_client)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = step_error(failure.value.cause)
    assert (cause.type, cause.non_retryable) == ("STRIPE_404", True)
    assert stripe_fake.calls[f"/v1/subscriptions/{sub}"] == 1


async def test_a_malformed_stripe_object_fails_at_once_and_writes_nothing(
    api, stripe_worker, temporal_client, org
):
    pi, ch = new_id("pi"), new_id("ch")
    bought = await started(api, event("payment_intent.succeeded", payment_intent(
        pi=pi, meta=metadata(org, "pack_500k"), charge=ch)), temporal_client)
    assert (await bought.result()).outcome == "applied"
    nameless = {"object": "refund", "charge": ch, "payment_intent": pi, "amount": 4900,
                "status": "succeeded"}  # a refund always has an id
    handle = await started(api, event("refund.created", nameless), temporal_client)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = step_error(failure.value.cause)
    assert (cause.type, cause.non_retryable) == ("MALFORMED_STRIPE_OBJECT", True)
    assert (await activity_attempts(handle))["apply_stripe_refunds"] == 1
    assert (await api.get(f"/v1/orgs/{org}/balance")).json()["balance"] == 500000


async def test_failures_lists_unresolved_events_with_their_reason(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, org
):
    """An unresolved purchase completes its workflow, but it is paid and not credited: it is
    listed beside the failed workflows, and the organization is told."""
    evt = event("payment_intent.succeeded",
                payment_intent(pi=new_id("pi"), meta=metadata(org, "pack_nope")))
    handle = await started(api, evt, temporal_client)
    assert (await handle.result()).outcome == "unresolved"
    listed = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                     "failures", "--org", org, "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["kind"], r["workflow_id"], r["event_type"]) for r in rows] == [
        ("unresolved", handle.id, "payment_intent.succeeded")]
    assert "unknown pack 'pack_nope'" in rows[0]["failure"]
    table = await asyncio.to_thread(cli, temporal_client, stripe_runtime, "failures", "--org", org)
    assert "unresolved" in table.output and "pack_nope" in table.output
    notes = (await api.get(f"/v1/orgs/{org}/notifications")).json()["notifications"]
    assert [n["type"] for n in notes] == ["purchase.unresolved"]


async def test_a_failure_of_an_event_naming_no_organization_is_found_by_organization(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, stripe_fake: StripeFake, org
):
    """The invoice names no organization (only a linked customer) and its Stripe read keeps
    failing: `OrgId` was set right after the organization was resolved, before the read, so
    `billing failures --org` lists the failure."""
    sub, cus = new_id("sub"), new_id("cus")
    linked = event("customer.subscription.created",
                   subscription(sub=sub, customer=cus, price="price_pro_monthly",
                                status="past_due", meta=metadata(org)))
    assert (await (await started(api, linked, temporal_client)).result()).outcome == "applied"
    paid = event("invoice.payment_succeeded", invoice(customer=cus, sub=sub))
    stripe_fake.fail_with = 500
    try:
        handle = await started(api, paid, temporal_client)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    finally:
        stripe_fake.fail_with = None
    task_queue = stripe_runtime.settings.temporal_task_queue
    assert await failed_ids(temporal_client, org, task_queue) == {handle.id}
    listed = await asyncio.to_thread(cli, temporal_client, stripe_runtime,
                                     "failures", "--org", org, "--json")
    assert [row["workflow_id"] for row in json.loads(listed.output)] == [handle.id]
