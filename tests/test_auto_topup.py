"""Automatic top-up end to end (SPEC §5.8): settings over the API and the CLI, the trigger recorded
by the write that crossed the threshold, the worker's dispatcher, `AutoTopUpWorkflow` against the
Stripe fake, and the webhook and dispute that follow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from faults import (
    WorkerProcess,
    delete_schedules_of,
    wait_until,
    worker_env,
)
from http_helpers import balance, notification_types
from ledger_checks import assert_consistent
from stripe_fake import StripeFake
from stripe_payloads import dispute, event, metadata, new_id, subscription
from temporal_helpers import outcome_of
from temporalio.client import Client
from temporalio.worker import Worker

from billing.clock import utcnow
from billing.ledger import EntryKind
from billing.models import AutoTopUpResult
from billing.runtime import Runtime
from billing.store.database import Doc
from starter.embedded import find_binary
from starter.topup_dispatch import run_topup_dispatcher

PACK = "pack_500k"
PACK_UNITS = 500_000
GRANT = 500  # the free plan's signup grant


@pytest.fixture
async def dispatcher(stripe_worker: Worker, stripe_runtime: Runtime,
                     temporal_client: Client) -> AsyncIterator[None]:
    """The worker's dispatcher, polling every 0.1 s, for the engine under test."""
    settings = stripe_runtime.settings.model_copy(update={"billing_outbox_poll_seconds": 0.1})
    runtime = Runtime(settings=settings, config=stripe_runtime.config, db=stripe_runtime.db)
    task = asyncio.create_task(run_topup_dispatcher(temporal_client, runtime))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def linked_org(api: httpx.AsyncClient, client: Client, fake: StripeFake, org: str, *,
                     outcome: str = "succeeded", default_method: bool = True) -> str:
    """A registered organization (free plan: its grant of 500 units) whose Stripe customer is
    linked by a subscription and pays off-session as `outcome`; the customer id."""
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    customer = new_id("cus")
    fake.customer(customer, outcome=outcome, default_method=default_method)
    sub = subscription(sub=new_id("sub"), customer=customer, price="price_starter_monthly",
                       meta=metadata(org))
    linked = await outcome_of(api, client, event("customer.subscription.created", sub))
    assert linked.outcome == "applied", linked
    return customer


async def configure(api: httpx.AsyncClient, org: str, *, below: int, max_per_month: int = 5,
                    enabled: bool = True) -> dict[str, Any]:
    response = await api.put(f"/v1/orgs/{org}/auto-topup", json={
        "enabled": enabled, "pack_id": PACK, "below_units": below,
        "max_per_month": max_per_month})
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def settings_of(api: httpx.AsyncClient, org: str) -> dict[str, Any]:
    response = await api.get(f"/v1/orgs/{org}/auto-topup")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def debit(runtime: Runtime, org: str, units: int) -> None:
    """An admin debit (`admin_post_adjustment` writes exactly this)."""
    result = await runtime.ledger.write(org, key=f"admin:{uuid.uuid4().hex}",
                                        kind=EntryKind.ADJUSTMENT, amount=-units, now=utcnow(),
                                        memo="test debit")
    assert result.applied


async def triggers_of(runtime: Runtime, org: str) -> list[str]:
    return [doc["_id"] async for doc in runtime.db["auto_topups"].find({"org_id": org}).sort(
        "n", 1)]


async def finished(client: Client, runtime: Runtime, org: str, n: int) -> AutoTopUpResult:
    """The result of `auto-topup-<org>-<n>`, once the dispatcher started it."""
    workflow_id = f"auto-topup-{org}-{n}"

    async def started() -> Doc | None:
        doc = await runtime.db["auto_topups"].find_one({"_id": workflow_id})
        return doc if doc is not None and "dispatch" not in doc else None

    await wait_until(started, f"the dispatcher to start {workflow_id}")
    handle = client.get_workflow_handle(workflow_id, result_type=AutoTopUpResult)
    return await handle.result()


async def in_flight(runtime: Runtime, org: str) -> str | None:
    account = await runtime.db.accounts.find_one({"_id": org})
    assert account is not None
    found: str | None = (account.get("auto_topup") or {}).get("in_flight")
    return found


async def test_sixteen_concurrent_usage_records_crossing_the_threshold_buy_once(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, dispatcher: None, org: str,
) -> None:
    customer = await linked_org(api, temporal_client, stripe_fake, org)
    assert await configure(api, org, below=400) == {
        "enabled": True, "pack_id": PACK, "below_units": 400, "max_per_month": 5}
    for i in range(5):  # the starter plan's weekly quota of 50000 units
        used = await api.post("/v1/usage", json={"org_id": org, "run_id": f"quota-{i}",
                                                 "units": 10_000})
        assert used.status_code == 200 and used.json()["overflow"] == 0, used.text
    assert await triggers_of(stripe_runtime, org) == []

    answers = await asyncio.gather(*(
        api.post("/v1/usage", json={"org_id": org, "run_id": f"cross-{i}", "units": 10})
        for i in range(16)))
    assert [(a.status_code, a.json()["overflow"]) for a in answers] == [(200, 10)] * 16

    result = await finished(temporal_client, stripe_runtime, org, 1)
    assert (result.outcome, result.credited_units) == ("succeeded", PACK_UNITS)
    assert await triggers_of(stripe_runtime, org) == [f"auto-topup-{org}-1"]
    intents = stripe_fake.intents_of(customer)
    assert len(intents) == 1
    intent = intents[0]
    assert (intent["id"], intent["amount"]) == (result.payment_intent, 4900)
    assert intent["metadata"] == {"org_id": org, "pack_id": PACK,
                                  "auto_topup": f"auto-topup-{org}-1"}
    assert await balance(api, org) == GRANT - 160 + PACK_UNITS
    entries = (await api.get(f"/v1/orgs/{org}/ledger")).json()["entries"]
    assert [e["key"] for e in entries if e["kind"] == "topup"] == [f"payment:{intent['id']}"]

    # The webhook of that payment comes after: it finds the purchase credited.
    late = await outcome_of(api, temporal_client, event("payment_intent.succeeded", intent))
    assert late.outcome == "duplicate", late
    assert await balance(api, org) == GRANT - 160 + PACK_UNITS
    assert await settings_of(api, org) == {
        "enabled": True, "pack_id": PACK, "below_units": 400, "max_per_month": 5,
        "paused": False, "this_month": 1}
    assert (await notification_types(api, org))["auto_topup.succeeded"] == 1
    await assert_consistent(stripe_runtime.db, org)


async def test_the_monthly_cap_stops_the_next_top_up(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, dispatcher: None, org: str,
) -> None:
    # No default payment method: the customer's card is charged.
    customer = await linked_org(api, temporal_client, stripe_fake, org, default_method=False)
    await configure(api, org, below=1000, max_per_month=2)
    # The balance (500) is already below: the first write that lowers it buys.
    await debit(stripe_runtime, org, 10)
    assert (await finished(temporal_client, stripe_runtime, org, 1)).outcome == "succeeded"
    card = stripe_fake.objects[stripe_fake.intents_of(customer)[0]["payment_method"]]
    assert (card["object"], card["customer"]) == ("payment_method", customer)
    await debit(stripe_runtime, org, PACK_UNITS)
    assert (await finished(temporal_client, stripe_runtime, org, 2)).outcome == "succeeded"
    assert await balance(api, org) == GRANT - 10 + PACK_UNITS

    await debit(stripe_runtime, org, PACK_UNITS)
    assert await in_flight(stripe_runtime, org) is None
    assert await triggers_of(stripe_runtime, org) == [f"auto-topup-{org}-1",
                                                      f"auto-topup-{org}-2"]
    assert len(stripe_fake.intents_of(customer)) == 2
    assert await balance(api, org) == GRANT - 10
    assert (await settings_of(api, org))["this_month"] == 2


async def test_three_failures_in_a_row_pause_until_enabled_again(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, dispatcher: None, org: str,
) -> None:
    customer = await linked_org(api, temporal_client, stripe_fake, org, outcome="declined")
    await configure(api, org, below=1000, max_per_month=2)
    reasons = []
    for n, outcome in enumerate(("declined", "requires_action", "declined"), start=1):
        stripe_fake.outcomes[customer] = outcome
        await debit(stripe_runtime, org, 10)
        result = await finished(temporal_client, stripe_runtime, org, n)
        assert (result.outcome, result.paused) == ("failed", n == 3)
        reasons.append(result.reason)
    assert reasons == ["card_declined", "requires_action", "card_declined"]

    await debit(stripe_runtime, org, 10)  # paused: no fourth attempt
    assert len(await triggers_of(stripe_runtime, org)) == 3
    assert len(stripe_fake.intents_of(customer)) == 3
    # Failures give their place in the month back (the cap is 2).
    assert await settings_of(api, org) == {
        "enabled": True, "pack_id": PACK, "below_units": 1000, "max_per_month": 2,
        "paused": True, "this_month": 0}
    types = await notification_types(api, org)
    assert (types["auto_topup.failed"], types["auto_topup.paused"]) == (3, 1)
    assert await balance(api, org) == GRANT - 40

    stripe_fake.outcomes[customer] = "succeeded"
    await configure(api, org, below=1000, max_per_month=2)  # enabling resumes
    assert (await settings_of(api, org))["paused"] is False
    await debit(stripe_runtime, org, 10)
    assert (await finished(temporal_client, stripe_runtime, org, 4)).outcome == "succeeded"
    assert await balance(api, org) == GRANT - 50 + PACK_UNITS


async def test_a_dispute_on_a_top_up_payment_disables_auto_top_up(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, dispatcher: None, org: str,
) -> None:
    customer = await linked_org(api, temporal_client, stripe_fake, org)
    await configure(api, org, below=1000)
    await debit(stripe_runtime, org, 10)
    assert (await finished(temporal_client, stripe_runtime, org, 1)).outcome == "succeeded"
    intent = stripe_fake.intents_of(customer)[0]

    withdrawn = dispute(dp=new_id("dp"), ch=intent["latest_charge"], pi=intent["id"],
                        amount=4900, status="needs_response")
    result = await outcome_of(api, temporal_client,
                                event("charge.dispute.funds_withdrawn", withdrawn))
    assert result.outcome == "applied" and "auto top-up disabled" in result.written, result
    # The clawback takes the balance below the threshold again: nothing is bought.
    assert await balance(api, org) == GRANT - 10
    assert await triggers_of(stripe_runtime, org) == [f"auto-topup-{org}-1"]
    assert (await settings_of(api, org))["enabled"] is False
    assert (await notification_types(api, org))["auto_topup.disabled"] == 1
    await debit(stripe_runtime, org, 10)
    assert await triggers_of(stripe_runtime, org) == [f"auto-topup-{org}-1"]
    assert len(stripe_fake.intents_of(customer)) == 1


async def test_a_dispute_on_another_purchase_leaves_auto_top_up_on(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, org: str,
) -> None:
    await linked_org(api, temporal_client, stripe_fake, org)
    await configure(api, org, below=100)
    pi, ch = new_id("pi"), new_id("ch")
    bought = stripe_fake.add({"id": pi, "object": "payment_intent", "amount": 4900,
                              "amount_received": 4900, "status": "succeeded",
                              "metadata": metadata(org, PACK), "latest_charge": ch,
                              "customer": None, "invoice": None})
    assert (await outcome_of(api, temporal_client,
                               event("payment_intent.succeeded", bought))).outcome == "applied"
    withdrawn = dispute(dp=new_id("dp"), ch=ch, pi=pi, amount=4900, status="needs_response")
    result = await outcome_of(api, temporal_client,
                                event("charge.dispute.funds_withdrawn", withdrawn))
    assert result.outcome == "applied" and "auto top-up disabled" not in result.written
    assert (await settings_of(api, org))["enabled"] is True


async def test_settings_refusals(
    api: httpx.AsyncClient, stripe_fake: StripeFake, temporal_client: Client, org: str,
) -> None:
    body = {"enabled": True, "pack_id": PACK, "below_units": 100, "max_per_month": 3}
    missing = await api.put(f"/v1/orgs/{org}/auto-topup", json=body)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "ORG_NOT_FOUND")
    assert (await api.get(f"/v1/orgs/{org}/auto-topup")).status_code == 404

    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    assert await settings_of(api, org) == {
        "enabled": False, "pack_id": None, "below_units": 0, "max_per_month": 0,
        "paused": False, "this_month": 0}
    unlinked = await api.put(f"/v1/orgs/{org}/auto-topup", json=body)
    assert (unlinked.status_code, unlinked.json()["error"]["code"]) == (409, "NO_PAYMENT_METHOD")
    # Disabling needs no customer.
    off = await api.put(f"/v1/orgs/{org}/auto-topup", json={**body, "enabled": False})
    assert off.status_code == 200 and off.json()["enabled"] is False

    unknown = await api.put(f"/v1/orgs/{org}/auto-topup", json={**body, "pack_id": "pack_x"})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (422, "UNKNOWN_PACK")
    for bad in ({**body, "below_units": -1}, {**body, "extra": 1}, {**body, "enabled": "yes"},
                {k: v for k, v in body.items() if k != "max_per_month"}):
        refused = await api.put(f"/v1/orgs/{org}/auto-topup", json=bad)
        assert (refused.status_code, refused.json()["error"]["code"]) == (
            422, "VALIDATION_ERROR"), bad
    invalid = await api.put("/v1/orgs/bad%20id/auto-topup", json=body)
    assert (invalid.status_code, invalid.json()["error"]["code"]) == (422, "INVALID_ORG_ID")


async def billing_cli(*args: str, runtime: Runtime) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
    env.update(COLUMNS="200", MONGODB_URI=runtime.settings.mongodb_uri,
               MONGODB_DB=runtime.settings.mongodb_db)
    proc = await asyncio.create_subprocess_exec(
        find_binary("billing"), "auto-topup", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_shows_and_sets_auto_top_up(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, org: str,
) -> None:
    await linked_org(api, temporal_client, stripe_fake, org)
    code, out, _ = await billing_cli(org, "--enable", "--pack", PACK, "--below", "300",
                                     "--max-per-month", "4", "--json", runtime=stripe_runtime)
    assert code == 0
    assert json.loads(out) == {"enabled": True, "pack_id": PACK, "below_units": 300,
                               "max_per_month": 4, "paused": False, "this_month": 0}
    code, out, _ = await billing_cli(org, "--below", "50", runtime=stripe_runtime)
    assert code == 0 and "below 50 units" in out and "enabled" in out
    assert (await settings_of(api, org))["below_units"] == 50

    code, _, err = await billing_cli(org, "--pack", "pack_x", runtime=stripe_runtime)
    assert code == 1 and "UNKNOWN_PACK" in err
    code, _, err = await billing_cli("org-never-registered", runtime=stripe_runtime)
    assert code == 1 and "ORG_NOT_FOUND" in err


async def test_a_trigger_recorded_while_no_worker_runs_is_bought_once_it_starts(
    api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime,
    temporal_client: Client, org: str, tmp_path: Path,
) -> None:
    """No dispatcher runs when the debit commits (a worker down, or killed right after the
    commit): `billing worker` starts the recorded top-up when it comes up."""
    customer = await linked_org(api, temporal_client, stripe_fake, org)
    await configure(api, org, below=1000)
    await debit(stripe_runtime, org, 10)
    trigger = await stripe_runtime.db["auto_topups"].find_one({"_id": f"auto-topup-{org}-1"})
    assert trigger is not None and trigger["dispatch"] == "pending"
    assert stripe_fake.intents_of(customer) == []

    queue = f"billing-topup-{uuid.uuid4().hex[:8]}"
    settings = stripe_runtime.settings.model_copy(update={"temporal_task_queue": queue})
    process = WorkerProcess(worker_env(settings, temporal_client), tmp_path / "worker.log")
    try:
        await process.start()
        result = await finished(temporal_client, stripe_runtime, org, 1)
    finally:
        await process.stop()
        await delete_schedules_of(temporal_client, queue)
    assert result.outcome == "succeeded"
    assert len(stripe_fake.intents_of(customer)) == 1
    assert await balance(api, org) == GRANT - 10 + PACK_UNITS
