"""A real Stripe peer: `localstripe` on 127.0.0.1 takes a payment through the Stripe API and
delivers its own signed webhook to the receiver, served over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
import uvicorn
from localstripe_server import LocalStripe
from stripe_payloads import PRIMARY_SECRET
from temporalio.client import Client
from typer.testing import CliRunner

from billing.runtime import Runtime
from starter.api.app import create_app
from starter.cli import app as cli_app
from starter.embedded import (
    free_port,
    wait_for_port,
)
from worker import build_worker

API_KEY = LocalStripe.API_KEY


@pytest.fixture(scope="module")
async def localstripe() -> AsyncIterator[str]:
    """localstripe, a Stripe stand-in written by others: the engine's reads and Stripe's
    signature against a peer the project did not write."""
    server = LocalStripe(port=free_port())
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def receiver(runtime: Runtime, temporal_client: Client,
                   localstripe: str) -> AsyncIterator[str]:
    """The engine against localstripe: a worker on its own task queue and the ASGI app served by
    uvicorn on a free port."""
    settings = runtime.settings.model_copy(update={
        "stripe_api_base": localstripe, "stripe_api_key": API_KEY,
        "temporal_task_queue": f"billing-localstripe-{uuid.uuid4().hex[:8]}",
    })
    engine = Runtime(settings=settings, config=runtime.config, db=runtime.db)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, temporal_client), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        async with build_worker(temporal_client, engine):
            await wait_for_port(port, "the webhook receiver")
            yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def wait_for_balance(client: httpx.AsyncClient, org: str, units: int) -> dict[str, Any]:
    for _ in range(150):
        response = await client.get(f"/v1/orgs/{org}/balance")
        if response.status_code == 200 and response.json()["balance"] == units:
            found: dict[str, Any] = response.json()
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"the balance of {org} never reached {units}")


async def test_localstripe_payment_is_credited_through_its_own_webhook(
    receiver: str, localstripe: str, org: str
):
    url = receiver
    async with httpx.AsyncClient(base_url=localstripe) as peer:
        configured = await peer.post("/_config/webhooks/billing", data={
            "url": f"{url}/stripe/webhook", "secret": PRIMARY_SECRET})
        assert configured.status_code == 200, configured.text

    client = stripe.StripeClient(API_KEY, base_addresses={"api": localstripe},
                                 max_network_retries=0)
    method = await client.v1.payment_methods.create_async({
        "type": "card",
        "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"},
    })
    intent = await client.v1.payment_intents.create_async({
        "amount": 4900, "currency": "usd", "payment_method": method.id, "confirm": True,
        "metadata": {"org_id": org, "pack_id": "pack_500k"},
    })
    assert intent.status == "succeeded"

    async with httpx.AsyncClient(base_url=url,
                                 headers={"Authorization": "Bearer test-token"}) as api:
        balance = await wait_for_balance(api, org, 500000)
        assert [lot["units"] for lot in balance["lots"]] == [500000]
        entries = (await api.get(f"/v1/orgs/{org}/ledger")).json()["entries"]
        assert [(e["key"], e["amount"]) for e in entries] == [(f"payment:{intent.id}", 500000)]


async def test_send_test_event_reaches_the_receiver(receiver: str, org: str):
    url = receiver
    env = {"STRIPE_WEBHOOK_SECRET": PRIMARY_SECRET}
    result = await asyncio.to_thread(
        CliRunner().invoke, cli_app,
        ["send-test-event", "payment_intent.succeeded", "--org", org, "--pack", "pack_500k",
         "--url", f"{url}/stripe/webhook"], env=env)
    assert result.exit_code == 0, result.output
    assert '"status":"started"' in result.output
    async with httpx.AsyncClient(base_url=url,
                                 headers={"Authorization": "Bearer test-token"}) as api:
        await wait_for_balance(api, org, 500000)
    bad = await asyncio.to_thread(CliRunner().invoke, cli_app,
                                  ["send-test-event", "plan.created", "--url", url], env=env)
    assert bad.exit_code == 2
