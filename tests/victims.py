"""The organization hostile requests aim at (a purchased lot, a linked Stripe customer), and a
snapshot of what a change could write, for the bad-input and security tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from stripe_payloads import (
    deliver,
    event,
    metadata,
    new_id,
    payment_intent,
    subscription,
)
from temporalio.client import Client

from billing.models import StripeEventOutcome
from billing.store.database import Database

Obj = dict[str, Any]
PACK = "pack_500k"


#: The collections a hostile request could write to (the event records are checked apart).
WATCHED = ("accounts", "ledger", "lots", "meters", "usage", "notifications", "subscriptions")


@dataclass(frozen=True)
class Victim:
    """A registered organization with a purchased lot and a linked Stripe customer: what a
    query matching more than it should would hit."""

    org: str
    pi: str
    ch: str
    customer: str
    balance: int


@pytest.fixture(scope="module")
async def victim(api: httpx.AsyncClient, stripe_worker: Any, temporal_client: Client) -> Victim:
    org, pi, ch, cus = new_id("org"), new_id("pi"), new_id("ch"), new_id("cus")
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    for evt in (
        event("payment_intent.succeeded", payment_intent(pi=pi, meta=metadata(org, PACK),
                                                         charge=ch)),
        event("customer.subscription.created",
              subscription(sub=new_id("sub"), customer=cus, price="price_starter_monthly",
                           meta=metadata(org))),
    ):
        assert (await recorded(api, temporal_client, evt)).outcome == "applied"
    return Victim(org=org, pi=pi, ch=ch, customer=cus, balance=500 + 500000)


async def recorded(api: httpx.AsyncClient, client: Client, evt: Obj) -> StripeEventOutcome:
    response = await deliver(api, evt)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "started", "workflow_id": f"stripe-{evt['id']}"}
    handle = client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)
    result: StripeEventOutcome = await handle.result()
    return result


async def snapshot(db: Database) -> dict[str, object]:
    """Document counts of every collection a change writes, with the fields an update of an
    existing account or subscription would move."""
    counts: dict[str, object] = {name: await db[name].count_documents({}) for name in WATCHED}
    counts["accounts_state"] = sorted(
        (doc["_id"], doc.get("balance"), doc.get("seq"), doc.get("plan_id"))
        for doc in await db.accounts.find({}, {"balance": 1, "seq": 1, "plan_id": 1}).to_list())
    counts["subscriptions_state"] = sorted(
        (doc["_id"], str(doc.get("updated_at")), str(doc.get("stripe_customer_id")))
        for doc in await db.subscriptions.find(
            {}, {"updated_at": 1, "stripe_customer_id": 1}).to_list())
    return counts
