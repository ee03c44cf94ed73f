"""`POST /stripe/webhook`: what the receiver refuses, ignores and starts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from stripe_payloads import (
    ROTATED_SECRET,
    deliver,
    event,
    metadata,
    new_id,
    payment_intent,
    sign,
)

from billing.runtime import Runtime
from starter.api.app import create_app
from starter.embedded import free_port


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def test_signature_is_required_valid_and_recent(api, stripe_worker, org):
    evt = event("payment_intent.succeeded", payment_intent(pi=new_id("pi"),
                                                           meta=metadata(org, "pack_500k")))
    body = json.dumps(evt).encode()
    missing = await api.post("/stripe/webhook", content=body)
    assert (missing.status_code, error_code(missing)) == (400, "SIGNATURE_MISSING")
    forged = await api.post("/stripe/webhook", content=body,
                            headers={"Stripe-Signature": sign(body, "whsec_someone_else")})
    assert (forged.status_code, error_code(forged)) == (400, "SIGNATURE_INVALID")
    tampered = await api.post("/stripe/webhook", content=body.replace(b"4900", b"4901"),
                              headers={"Stripe-Signature": sign(body)})
    assert (tampered.status_code, error_code(tampered)) == (400, "SIGNATURE_INVALID")
    stale = await deliver(api, evt, timestamp=int(time.time()) - 301)
    assert (stale.status_code, error_code(stale)) == (400, "SIGNATURE_EXPIRED")
    # Signed in whole seconds: a margin so that the clock moving on while the request is
    # handled cannot bring it back within the tolerance.
    ahead = await deliver(api, evt, timestamp=int(time.time()) + 310)
    assert (ahead.status_code, error_code(ahead)) == (400, "SIGNATURE_EXPIRED")
    garbage = await api.post("/stripe/webhook", content=body,
                             headers={"Stripe-Signature": "not a signature"})
    assert (garbage.status_code, error_code(garbage)) == (400, "SIGNATURE_INVALID")
    # Nothing was started by any of them.
    unknown = await api.get(f"/v1/stripe-events/{evt['id']}")
    assert unknown.status_code == 404

    rotated = await deliver(api, evt, secret=ROTATED_SECRET)
    assert rotated.json() == {"status": "started", "workflow_id": f"stripe-{evt['id']}"}


async def test_malformed_bodies_are_refused(api, stripe_worker):
    for body, code in ((b"{not json", "MALFORMED_JSON"),
                       (b'["a list"]', "MALFORMED_EVENT"),
                       (b'{"id": "evt_1", "type": "invoice.paid", "created": "yesterday", '
                        b'"data": {"object": {}}}', "MALFORMED_EVENT"),
                       (b'{"id": "evt_1", "type": "invoice.paid", "created": 1}',
                        "MALFORMED_EVENT")):
        response = await api.post("/stripe/webhook", content=body,
                                   headers={"Stripe-Signature": sign(body)})
        assert (response.status_code, error_code(response)) == (400, code), body


async def test_bodies_above_one_mebibyte_are_refused(api, stripe_worker):
    big = b"{" + b" " * (1024 * 1024) + b"}"
    declared = await api.post("/stripe/webhook", content=big,
                              headers={"Stripe-Signature": sign(big)})
    assert (declared.status_code, error_code(declared)) == (413, "PAYLOAD_TOO_LARGE")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the body itself counts
        for _ in range(17):
            yield b" " * 65536

    streamed = await api.post("/stripe/webhook", content=chunks(),
                              headers={"Stripe-Signature": sign(b"")})
    assert (streamed.status_code, error_code(streamed)) == (413, "PAYLOAD_TOO_LARGE")


async def test_unhandled_types_are_ignored_without_a_workflow(api, stripe_worker, temporal_client):
    evt = event("plan.created", {"id": "price_x", "object": "plan", "metadata": {}})
    response = await deliver(api, evt)
    assert response.json() == {"status": "ignored", "workflow_id": None}
    assert (await api.get(f"/v1/stripe-events/{evt['id']}")).status_code == 404


async def test_temporal_unreachable_answers_503(stripe_runtime: Runtime, org):
    settings = stripe_runtime.settings.model_copy(
        update={"temporal_address": f"127.0.0.1:{free_port()}"})
    runtime = Runtime(settings=settings, config=stripe_runtime.config, db=stripe_runtime.db)
    app = create_app(runtime)  # no client: connects on first use, and cannot
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as client:
        evt = event("payment_intent.succeeded", payment_intent(pi=new_id("pi"),
                                                               meta=metadata(org, "pack_500k")))
        response = await deliver(client, evt)
    assert (response.status_code, error_code(response)) == (503, "TEMPORAL_UNAVAILABLE")
    assert await stripe_runtime.db.accounts.find_one({"_id": org}) is None


def _other_mode_count(event_type: str, livemode: bool) -> float:
    return REGISTRY.get_sample_value("billing_stripe_webhooks_other_mode_total", {
        "type": event_type, "livemode": str(livemode).lower()}) or 0.0


async def test_events_of_the_other_mode_are_ignored_without_a_workflow_and_counted(
        api, stripe_runtime: Runtime, temporal_client, stripe_worker, org):
    """SPEC §5.5: an event whose `livemode` differs from the API key's mode (`sk_live_`/
    `rk_live_` keys are live) is answered 200 `ignored`, starts nothing and is counted; an
    event without `livemode` keeps the usual path."""
    def purchase(livemode: bool | None) -> dict:
        evt = event("payment_intent.succeeded", payment_intent(
            pi=new_id("pi"), meta=metadata(org, "pack_500k")))
        if livemode is None:
            evt.pop("livemode")
        else:
            evt["livemode"] = livemode
        return evt

    # The tests' key is a test key (`sk_test_`): a live event is the other mode.
    live = purchase(True)
    before = _other_mode_count("payment_intent.succeeded", True)
    response = await deliver(api, live)
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "workflow_id": None}
    assert (await api.get(f"/v1/stripe-events/{live['id']}")).status_code == 404
    assert _other_mode_count("payment_intent.succeeded", True) == before + 1
    scraped = [sample for family in text_string_to_metric_families(
        (await api.get("/metrics")).text) for sample in family.samples
        if sample.name == "billing_stripe_webhooks_other_mode_total"]
    assert {"type": "payment_intent.succeeded", "livemode": "true"} in [
        sample.labels for sample in scraped]

    for same_mode in (purchase(False), purchase(None)):
        started = await deliver(api, same_mode)
        assert started.json() == {"status": "started",
                                  "workflow_id": f"stripe-{same_mode['id']}"}

    # A live key (`rk_live_` restricted keys too): a test event is the other mode.
    settings = stripe_runtime.settings.model_copy(update={"stripe_api_key": "rk_live_billing"})
    runtime = Runtime(settings=settings, config=stripe_runtime.config, db=stripe_runtime.db)
    app = create_app(runtime, temporal_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as live_api:
        test_event = purchase(False)
        before = _other_mode_count("payment_intent.succeeded", False)
        ignored = await deliver(live_api, test_event)
        assert ignored.json() == {"status": "ignored", "workflow_id": None}
        assert _other_mode_count("payment_intent.succeeded", False) == before + 1
        assert (await api.get(f"/v1/stripe-events/{test_event['id']}")).status_code == 404
