"""Purchases the engine starts (SPEC §5.9): `POST /v1/orgs/{org}/checkout` and
`/billing-portal` through the real Stripe SDK against the Stripe fake, and the purchase's events
decided by the checkout record whatever their metadata says."""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from typing import Any

import httpx
import pytest
from http_helpers import balance, error_of
from stripe_fake import StripeFake
from stripe_payloads import deliver, event
from temporalio.client import Client

from billing.models import StripeEventOutcome
from billing.runtime import Runtime

PACK = "pack_500k"
PACK_UNITS = 500_000
GRANT = 500  # the free plan's signup grant
SESSIONS = "/v1/checkout/sessions"

pytestmark = pytest.mark.usefixtures("stripe_worker")


def new_org() -> str:
    return f"co-{uuid.uuid4().hex[:10]}"


async def registered(api: httpx.AsyncClient) -> str:
    org = new_org()
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    return org


async def checkout(api: httpx.AsyncClient, org: str, body: dict[str, Any],
                   key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await api.post(f"/v1/orgs/{org}/checkout", json=body, headers=headers)


def sessions_of(fake: StripeFake, org: str) -> list[dict[str, Any]]:
    return [s for s in fake.created.get("checkout.session", [])
            if s["metadata"].get("org_id") == org]


def customers_of(fake: StripeFake, org: str) -> list[dict[str, Any]]:
    return [c for c in fake.created.get("customer", []) if c["metadata"].get("org_id") == org]


async def outcome_of(api: httpx.AsyncClient, client: Client,
                     evt: dict[str, Any]) -> StripeEventOutcome:
    response = await deliver(api, evt)
    assert response.status_code == 200, response.text
    handle = client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)
    return await handle.result()


def stripped(obj: dict[str, Any], **metadata: str) -> dict[str, Any]:
    """The object as a merchant integration may leave it: its metadata replaced."""
    return {**obj, "metadata": dict(metadata)}


async def test_a_pack_checkout_of_two_credits_its_org_twice_the_pack_whatever_the_metadata(
        api: httpx.AsyncClient, stripe_fake: StripeFake, temporal_client: Client) -> None:
    org = await registered(api)
    other = await registered(api)
    response = await checkout(api, org, {"pack_id": PACK, "quantity": 2})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert re.fullmatch(r"co_[0-9a-f]{24}", answer["checkout_id"])
    assert answer["units"] == 2 * PACK_UNITS and answer["lot_expires_at_most_days"] == 365
    assert answer["pack_id"] == PACK and answer["quantity"] == 2

    [session] = sessions_of(stripe_fake, org)
    assert answer["url"] == session["url"]
    assert session["client_reference_id"] == answer["checkout_id"]
    assert session["mode"] == "payment"
    assert session["metadata"] == {"org_id": org, "pack_id": PACK,
                                   "checkout_id": answer["checkout_id"]}
    [customer] = customers_of(stripe_fake, org)
    assert session["customer"] == customer["id"]
    [line] = stripe_fake.line_items[session["id"]]
    assert (line["price"]["id"], line["quantity"]) == ("price_pack_500k", 2)
    subscription = (await api.get(f"/v1/orgs/{org}/subscription")).json()
    assert subscription["stripe_customer_id"] == customer["id"]

    paid = stripe_fake.complete_checkout(session["id"])
    intent = stripe_fake.objects[paid["payment_intent"]]
    assert intent["metadata"]["checkout_id"] == answer["checkout_id"]
    # The integration stripped the engine's metadata and named another organization: the
    # checkout record decides.
    intent["metadata"] = {"org_id": other}
    events = [event("checkout.session.completed", stripped(paid, org_id=other)),
              event("payment_intent.succeeded", stripped(intent, org_id=other))]
    deliveries = events * 2
    random.Random(7).shuffle(deliveries)
    outcomes = {evt["id"]: await outcome_of(api, temporal_client, evt) for evt in deliveries}
    assert sorted(o.outcome for o in outcomes.values()) == ["applied", "duplicate"], outcomes
    assert {o.org_id for o in outcomes.values()} == {org}
    assert await balance(api, org) == GRANT + 2 * PACK_UNITS
    assert await balance(api, other) == GRANT


async def test_the_same_idempotency_key_gives_one_customer_and_one_session(
        api: httpx.AsyncClient, stripe_fake: StripeFake) -> None:
    org = await registered(api)
    key = f"buy-{uuid.uuid4().hex}"
    answers = await asyncio.gather(*(checkout(api, org, {"pack_id": PACK}, key)
                                     for _ in range(3)))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    assert len({(r.json()["checkout_id"], r.json()["url"]) for r in answers}) == 1
    assert len(sessions_of(stripe_fake, org)) == 1
    assert len(customers_of(stripe_fake, org)) == 1

    again = await checkout(api, org, {"pack_id": PACK}, key)
    assert again.json() == answers[0].json()
    other_body = await checkout(api, org, {"pack_id": PACK, "quantity": 3}, key)
    assert other_body.status_code == 409
    assert error_of(other_body)["code"] == "IDEMPOTENCY_KEY_REUSED"
    fresh = await checkout(api, org, {"pack_id": PACK})
    assert fresh.json()["checkout_id"] != answers[0].json()["checkout_id"]
    assert len(sessions_of(stripe_fake, org)) == 2
    assert len(customers_of(stripe_fake, org)) == 1


async def test_a_request_that_died_between_the_record_and_stripe_is_completed_by_its_retry(
        api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime) -> None:
    org = await registered(api)
    key = f"buy-{uuid.uuid4().hex}"
    stripe_fake.fail_paths[SESSIONS] = 500
    try:
        failed = await checkout(api, org, {"pack_id": PACK}, key)
    finally:
        del stripe_fake.fail_paths[SESSIONS]
    assert failed.status_code == 503
    assert error_of(failed)["code"] == "STRIPE_UNAVAILABLE"
    # What the first attempt left: the customer, linked, and the record without a session.
    [record] = [doc async for doc in stripe_runtime.db.checkouts.find({"org_id": org})]
    assert "url" not in record
    assert sessions_of(stripe_fake, org) == []

    retried = await checkout(api, org, {"pack_id": PACK}, key)
    assert retried.status_code == 200, retried.text
    assert retried.json()["checkout_id"] == record["_id"]
    assert len(sessions_of(stripe_fake, org)) == 1
    assert len(customers_of(stripe_fake, org)) == 1


async def test_a_lost_answer_from_stripe_makes_no_second_session(
        api: httpx.AsyncClient, stripe_fake: StripeFake) -> None:
    """Stripe made the session but its answer was lost: the client's retry under the same
    idempotency key is answered that session."""
    org = await registered(api)
    stripe_fake.lose_response.add(SESSIONS)
    try:
        response = await checkout(api, org, {"pack_id": PACK})
    finally:
        stripe_fake.lose_response.discard(SESSIONS)
    assert response.status_code == 200, response.text
    [session] = sessions_of(stripe_fake, org)
    assert response.json()["url"] == session["url"]


async def test_stripe_down_is_503_and_nothing_half_written_stops_the_retry(
        api: httpx.AsyncClient, stripe_fake: StripeFake) -> None:
    org = await registered(api)
    key = f"buy-{uuid.uuid4().hex}"
    stripe_fake.fail_with = 503
    try:
        down = await checkout(api, org, {"pack_id": PACK}, key)
        portal = await api.post(f"/v1/orgs/{org}/billing-portal")
    finally:
        stripe_fake.fail_with = None
    assert down.status_code == 503 and error_of(down)["code"] == "STRIPE_UNAVAILABLE"
    assert portal.status_code == 409  # no customer could be made
    retried = await checkout(api, org, {"pack_id": PACK}, key)
    assert retried.status_code == 200, retried.text
    assert len(customers_of(stripe_fake, org)) == 1


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"pack_id": "pack_nope"}, 422, "UNKNOWN_PACK"),
    ({"plan_id": "plan_nope"}, 422, "UNKNOWN_PLAN"),
    ({"plan_id": "free"}, 409, "ALREADY_SUBSCRIBED"),
    ({"pack_id": PACK, "quantity": 0}, 422, "VALIDATION_ERROR"),
    ({"pack_id": PACK, "quantity": 101}, 422, "VALIDATION_ERROR"),
    ({"pack_id": PACK, "success_url": "/billing"}, 422, "VALIDATION_ERROR"),
    ({"pack_id": PACK, "cancel_url": "javascript:alert(1)"}, 422, "VALIDATION_ERROR"),
    ({"pack_id": PACK, "success_url": "ftp://app.example.com/x"}, 422, "VALIDATION_ERROR"),
    ({"pack_id": PACK, "plan_id": "starter"}, 422, "VALIDATION_ERROR"),
    ({}, 422, "VALIDATION_ERROR"),
])
async def test_refusals(api: httpx.AsyncClient, stripe_fake: StripeFake, body: dict[str, Any],
                        status: int, code: str) -> None:
    org = await registered(api)
    response = await checkout(api, org, body)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
    assert sessions_of(stripe_fake, org) == [] and customers_of(stripe_fake, org) == []


async def test_an_unknown_org_is_404(api: httpx.AsyncClient) -> None:
    response = await checkout(api, new_org(), {"pack_id": PACK})
    assert response.status_code == 404
    assert error_of(response)["code"] == "ORG_NOT_FOUND"


async def test_the_urls_given_go_to_checkout_and_the_defaults_otherwise(
        api: httpx.AsyncClient, stripe_fake: StripeFake, stripe_runtime: Runtime) -> None:
    org = await registered(api)
    given = {"success_url": "https://shop.example.org/ok?x=1",
             "cancel_url": "http://localhost:3000/billing"}
    assert (await checkout(api, org, {"pack_id": PACK, **given})).status_code == 200
    assert (await checkout(api, org, {"pack_id": PACK})).status_code == 200
    first, second = sessions_of(stripe_fake, org)
    assert (first["success_url"], first["cancel_url"]) == tuple(given.values())
    defaults = stripe_runtime.config.checkout
    assert (second["success_url"], second["cancel_url"]) == (defaults.success_url,
                                                             defaults.cancel_url)


async def test_a_plan_checkout_subscribes_its_org_then_refuses_a_second_subscription(
        api: httpx.AsyncClient, stripe_fake: StripeFake, temporal_client: Client) -> None:
    org = await registered(api)
    response = await checkout(api, org, {"plan_id": "starter"})
    assert response.status_code == 200, response.text
    assert response.json()["units"] is None
    [session] = sessions_of(stripe_fake, org)
    assert session["mode"] == "subscription"
    assert [line["price"]["id"] for line in stripe_fake.line_items[session["id"]]] == [
        "price_starter_monthly"]

    paid = stripe_fake.complete_checkout(session["id"])
    sub = stripe_fake.objects[paid["subscription"]]
    assert sub["metadata"]["checkout_id"] == response.json()["checkout_id"]
    done = await outcome_of(api, temporal_client,
                            event("checkout.session.completed", stripped(paid)))
    assert (done.outcome, done.org_id) == ("applied", org), done
    # The subscription's metadata names another organization beside the engine's checkout id.
    created = await outcome_of(api, temporal_client, event(
        "customer.subscription.created",
        stripped(sub, org_id="someone-else", checkout_id=response.json()["checkout_id"]),
        created=int(sub["created"]) + 1))
    assert created.org_id == org, created
    state = (await api.get(f"/v1/orgs/{org}/subscription")).json()
    assert (state["plan_id"], state["status"]) == ("starter", "active")
    assert state["stripe_subscription_id"] == sub["id"]

    again = await checkout(api, org, {"plan_id": "starter"})
    assert again.status_code == 409 and error_of(again)["code"] == "ALREADY_SUBSCRIBED"
    upgrade = await checkout(api, org, {"plan_id": "pro"})
    assert upgrade.status_code == 409 and error_of(upgrade)["code"] == "ALREADY_SUBSCRIBED"
    assert "billing portal" in error_of(upgrade)["message"]


async def test_a_session_naming_a_checkout_the_engine_never_made_is_unresolved(
        api: httpx.AsyncClient, stripe_fake: StripeFake, temporal_client: Client) -> None:
    org = await registered(api)
    assert (await checkout(api, org, {"pack_id": PACK})).status_code == 200
    [session] = sessions_of(stripe_fake, org)
    paid = stripe_fake.complete_checkout(session["id"])
    forged = {**paid, "client_reference_id": f"co_{uuid.uuid4().hex[:24]}",
              "metadata": {"org_id": org, "pack_id": PACK}}
    result = await outcome_of(api, temporal_client, event("checkout.session.completed", forged))
    assert result.outcome == "unresolved", result
    assert "not a checkout the engine made" in (result.reason or "")
    assert await balance(api, org) == GRANT


async def test_the_billing_portal_needs_a_customer_then_answers_its_session(
        api: httpx.AsyncClient, stripe_fake: StripeFake) -> None:
    org = await registered(api)
    none = await api.post(f"/v1/orgs/{org}/billing-portal")
    assert none.status_code == 409 and error_of(none)["code"] == "NO_CUSTOMER"
    assert (await checkout(api, org, {"pack_id": PACK})).status_code == 200
    response = await api.post(f"/v1/orgs/{org}/billing-portal",
                              json={"return_url": "https://app.example.com/settings"})
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    [portal] = [p for p in stripe_fake.created["billing_portal.session"] if p["url"] == url]
    [customer] = customers_of(stripe_fake, org)
    assert portal["customer"] == customer["id"]
    assert portal["return_url"] == "https://app.example.com/settings"
    bad = await api.post(f"/v1/orgs/{org}/billing-portal", json={"return_url": "nope"})
    assert bad.status_code == 422


async def test_the_openapi_schema_documents_every_field(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    parts = schema["components"]["schemas"]
    for model, fields in {
        "CheckoutBody": {"pack_id", "quantity", "plan_id", "success_url", "cancel_url"},
        "CheckoutAnswer": {"checkout_id", "url", "expires_at", "units",
                           "lot_expires_at_most_days"},
        "PortalBody": {"return_url"},
        "PortalAnswer": {"url"},
    }.items():
        properties = parts[model]["properties"]
        assert fields <= set(properties), model
        assert all(properties[f].get("description") for f in fields - {"pack_id", "plan_id"})
    operation = schema["paths"]["/v1/orgs/{org}/checkout"]["post"]
    assert {"409", "422", "503"} <= set(operation["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in operation["parameters"])

