"""A corpus of hostile and malformed requests to the webhook and `/v1`.

Every request gets a clear 4xx in the error format of SPEC §7, a 200 `ignored` without a
workflow, or - for signed events that reach `StripeEventWorkflow` - a recorded `unresolved` or
`ignored` outcome. Nothing is written that should not be, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from stripe_fake import StripeFake
from stripe_payloads import (
    PRIMARY_SECRET,
    charge,
    checkout_session,
    deliver,
    dispute,
    event,
    invoice,
    metadata,
    new_id,
    payment_intent,
    refund,
    sign,
    subscription,
)
from temporal_helpers import activity_attempts, step_error
from temporalio.client import Client, WorkflowFailureError
from victims import PACK, Victim, recorded, snapshot

from billing.models import StripeEventOutcome
from billing.store.database import Database

Obj = dict[str, Any]

TEN_KB = "x" * 10_240
TWO_MIB = 2 * 1024 * 1024
#: The collections a hostile request could write to (the event records are checked apart).


@dataclass(frozen=True)
class Probe:
    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """Answered at once with this status and error code."""

    status: int
    code: str


@dataclass(frozen=True)
class Ignored:
    """A signed event of a type the engine does not handle: 200 `ignored`, no workflow."""


@dataclass(frozen=True)
class Recorded:
    """A signed event that starts `StripeEventWorkflow`, which records this outcome and writes
    nothing but the notifications `notified` (an unresolved purchase tells its organization)."""

    outcome: str
    notified: tuple[str, ...] = ()


Expect = Refused | Ignored | Recorded
Make = Callable[[Victim, StripeFake], Probe | Obj]


@dataclass(frozen=True)
class Case:
    name: str
    make: Make  # a `Probe`, or a Stripe event to deliver signed
    expect: Expect


# ---- building requests -----------------------------------------------------------------------


def signed(body: bytes, *, secret: str = PRIMARY_SECRET, timestamp: int | None = None,
           signature: str | None = None) -> Probe:
    header = signature if signature is not None else sign(body, secret, timestamp)
    return Probe("POST", "/stripe/webhook", body, {"Stripe-Signature": header})


def envelope(**fields: Any) -> bytes:
    """A raw event envelope: everything a test leaves out is missing."""
    return json.dumps(fields).encode()


def evt_body(**overrides: Any) -> bytes:
    evt = event("payment_intent.succeeded", payment_intent(pi=new_id("pi"), meta={}))
    evt.update(overrides)
    return json.dumps(evt).encode()


def usage(body: object) -> Probe:
    return Probe("POST", "/v1/usage", json.dumps(body).encode(),
                 {"Content-Type": "application/json"})


def raw_usage(content: bytes, content_type: str = "application/json") -> Probe:
    return Probe("POST", "/v1/usage", content, {"Content-Type": content_type})


def get(path: str, **headers: str) -> Probe:
    return Probe("GET", path, headers=headers)


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


OPERATOR = json.dumps({"$gt": ""})


def purchase(v: Victim, meta: Obj, *, pi: str | None = None) -> Obj:
    return event("payment_intent.succeeded", payment_intent(pi=pi or new_id("pi"), meta=meta))


def unknown_price_checkout(v: Victim, fake: StripeFake) -> Obj:
    """A paid checkout naming the victim whose only line item is not a pack: never silent
    (SPEC 5.5), but nothing is credited."""
    session = checkout_session(payment_intent=None, meta=metadata(v.org))
    fake.line_items[session["id"]] = [
        {"id": new_id("li"), "object": "item", "price": {"id": "price_unknown"}, "quantity": 1}]
    return event("checkout.session.completed", session)


def smuggled_charge_refund(v: Victim) -> Obj:
    """`charge.refunded` whose id is an operator: it must not find the victim's lot."""
    obj = charge(ch=v.ch, pi=None, refunds=[refund(charge=v.ch, pi=None, amount=4900)])
    obj["id"] = {"$ne": None}
    return event("charge.refunded", obj)


def smuggled_customer_deletion(v: Victim) -> Obj:
    """`customer.deleted` whose id is an operator: it must not unlink the victim."""
    return event("customer.deleted", {"id": {"$ne": None}, "object": "customer", "metadata": {}})


def smuggled_payment_intent(v: Victim) -> Obj:
    """A pack purchase naming the victim whose payment intent id is an operator."""
    obj = payment_intent(pi=new_id("pi"), meta=metadata(v.org, PACK))
    obj["id"] = {"$ne": None}
    return event("payment_intent.succeeded", obj)


CASES: list[Case] = [
    # ---- the webhook: signatures ------------------------------------------------------------
    Case("signature missing", lambda v, f: Probe("POST", "/stripe/webhook", evt_body()),
         Refused(400, "SIGNATURE_MISSING")),
    Case("signature empty", lambda v, f: signed(evt_body(), signature=""),
         Refused(400, "SIGNATURE_MISSING")),
    Case("signed with an unknown secret", lambda v, f: signed(evt_body(), secret="whsec_other"),
         Refused(400, "SIGNATURE_INVALID")),
    Case("signature garbage", lambda v, f: signed(evt_body(), signature="t=abc,v1=zz"),
         Refused(400, "SIGNATURE_INVALID")),
    Case("signature without v1", lambda v, f: signed(evt_body(), signature=f"t={int(time.time())}"),
         Refused(400, "SIGNATURE_INVALID")),
    Case("signature stale by 301 s",
         lambda v, f: signed(evt_body(), timestamp=int(time.time()) - 301),
         Refused(400, "SIGNATURE_EXPIRED")),
    Case("signature replayed over another body",
         lambda v, f: signed(evt_body(), signature=sign(evt_body())),
         Refused(400, "SIGNATURE_INVALID")),
    # ---- the webhook: bodies ------------------------------------------------------------------
    Case("body not JSON", lambda v, f: signed(b"{not json"), Refused(400, "MALFORMED_JSON")),
    Case("body not UTF-8", lambda v, f: signed(b'{"id": "\xff\xfe"}'),
         Refused(400, "SIGNATURE_INVALID")),
    Case("body 2 MiB", lambda v, f: signed(b'{"pad": "' + b"x" * TWO_MIB + b'"}'),
         Refused(413, "PAYLOAD_TOO_LARGE")),
    Case("body a JSON list", lambda v, f: signed(b"[1, 2]"), Refused(400, "MALFORMED_EVENT")),
    Case("body a JSON string", lambda v, f: signed(b'"evt"'), Refused(400, "MALFORMED_EVENT")),
    Case("event without data",
         lambda v, f: signed(envelope(id=new_id("evt"), type="invoice.paid", created=1)),
         Refused(400, "MALFORMED_EVENT")),
    Case("event without data.object",
         lambda v, f: signed(envelope(id=new_id("evt"), type="invoice.paid", created=1, data={})),
         Refused(400, "MALFORMED_EVENT")),
    Case("data.object a list",
         lambda v, f: signed(envelope(id=new_id("evt"), type="invoice.paid", created=1,
                                      data={"object": []})),
         Refused(400, "MALFORMED_EVENT")),
    Case("event id an operator", lambda v, f: signed(evt_body(id={"$gt": ""})),
         Refused(400, "MALFORMED_EVENT")),
    Case("event id of 10 KB", lambda v, f: signed(evt_body(id="evt_" + TEN_KB)),
         Refused(400, "MALFORMED_EVENT")),
    Case("event id with a slash", lambda v, f: signed(evt_body(id="evt_a/../b")),
         Refused(400, "MALFORMED_EVENT")),
    Case("event type a number", lambda v, f: signed(evt_body(type=42)),
         Refused(400, "MALFORMED_EVENT")),
    Case("event created a string", lambda v, f: signed(evt_body(created="yesterday")),
         Refused(400, "MALFORMED_EVENT")),
    Case("event created 10**30", lambda v, f: signed(evt_body(created=10**30)),
         Refused(400, "MALFORMED_EVENT")),
    Case("event created NaN",
         lambda v, f: signed(evt_body().replace(b'"created": ', b'"created": NaN, "x": ', 1)),
         Refused(400, "MALFORMED_EVENT")),
    Case("event type unknown",
         lambda v, f: signed(evt_body(type="made.up")), Ignored()),
    Case("event type of 10 KB", lambda v, f: signed(evt_body(type=TEN_KB)), Ignored()),
    # ---- the webhook: signed events that reach the workflow ---------------------------------
    Case("purchase of an unknown pack", lambda v, f: purchase(v, metadata(v.org, "pack_nope")),
         Recorded("unresolved", ("purchase.unresolved",))),
    Case("purchase without a pack", lambda v, f: purchase(v, metadata(v.org)),
         Recorded("ignored")),
    Case("purchase for an operator org id",
         lambda v, f: purchase(v, {"org_id": {"$gt": ""}, "pack_id": PACK}),
         Recorded("unresolved")),
    Case("purchase for a 10 KB org id", lambda v, f: purchase(v, metadata(TEN_KB, PACK)),
         Recorded("unresolved")),
    Case("purchase for org id $where", lambda v, f: purchase(v, metadata("$where", PACK)),
         Recorded("unresolved")),
    Case("purchase with an operator payment intent id",
         lambda v, f: smuggled_payment_intent(v), Recorded("unresolved")),
    Case("checkout of an unknown price", unknown_price_checkout,
         Recorded("unresolved", ("purchase.unresolved",))),
    Case("checkout in setup mode",
         lambda v, f: event("checkout.session.completed",
                            checkout_session(payment_intent=None, meta=metadata(v.org, PACK),
                                             mode="setup")),
         Recorded("ignored")),
    Case("subscription of an unknown price and customer",
         lambda v, f: event("customer.subscription.updated",
                            subscription(sub=new_id("sub"), customer=new_id("cus"),
                                         price="price_unknown")),
         Recorded("unresolved")),
    Case("invoice failed for an unknown customer",
         lambda v, f: event("invoice.payment_failed",
                            invoice(customer=new_id("cus"), sub=new_id("sub"))),
         Recorded("unresolved")),
    Case("refund of an unknown charge",
         lambda v, f: event("refund.created",
                            refund(charge=new_id("ch"), pi=new_id("pi"), amount=10**30)),
         Recorded("unresolved")),
    Case("refund with an operator charge id", lambda v, f: smuggled_charge_refund(v),
         Recorded("unresolved")),
    Case("dispute of an unknown charge",
         lambda v, f: event("charge.dispute.funds_withdrawn",
                            dispute(dp=new_id("dp"), ch=new_id("ch"), pi=new_id("pi"),
                                    amount=-5, status="lost")),
         Recorded("unresolved")),
    Case("customer deletion with an operator id", lambda v, f: smuggled_customer_deletion(v),
         Recorded("unresolved")),
    # ---- /v1: authentication, routes and organization ids ----------------------------------
    Case("no bearer token", lambda v, f: get(f"/v1/orgs/{v.org}/balance", Authorization=""),
         Refused(401, "UNAUTHORIZED")),
    Case("wrong bearer token",
         lambda v, f: get(f"/v1/orgs/{v.org}/balance", Authorization="Bearer test-token-2"),
         Refused(401, "UNAUTHORIZED")),
    Case("bearer token prefix",
         lambda v, f: get(f"/v1/orgs/{v.org}/balance", Authorization="Bearer test-"),
         Refused(401, "UNAUTHORIZED")),
    Case("unknown route", lambda v, f: get("/v1/orgs"), Refused(404, "NOT_FOUND")),
    Case("wrong method", lambda v, f: Probe("DELETE", f"/v1/orgs/{v.org}"),
         Refused(405, "METHOD_NOT_ALLOWED")),
    Case("register an operator org id", lambda v, f: Probe("PUT", f"/v1/orgs/{quoted(OPERATOR)}"),
         Refused(422, "INVALID_ORG_ID")),
    Case("register a 10 KB org id", lambda v, f: Probe("PUT", f"/v1/orgs/{TEN_KB}"),
         Refused(422, "INVALID_ORG_ID")),
    Case("balance of org id $where", lambda v, f: get(f"/v1/orgs/{quoted('$where')}/balance"),
         Refused(422, "INVALID_ORG_ID")),
    Case("ledger of an operator org id",
         lambda v, f: get(f"/v1/orgs/{quoted(OPERATOR)}/ledger"), Refused(422, "INVALID_ORG_ID")),
    Case("balance of an unknown org", lambda v, f: get(f"/v1/orgs/{new_id('org')}/balance"),
         Refused(404, "ORG_NOT_FOUND")),
    Case("ledger limit 10**30", lambda v, f: get(f"/v1/orgs/{v.org}/ledger?limit={10**30}"),
         Refused(422, "VALIDATION_ERROR")),
    Case("ledger cursor an operator",
         lambda v, f: get(f"/v1/orgs/{v.org}/ledger?cursor={quoted(OPERATOR)}"),
         Refused(422, "INVALID_CURSOR")),
    Case("stripe event id of 10 KB", lambda v, f: get(f"/v1/stripe-events/evt_{TEN_KB}"),
         Refused(422, "VALIDATION_ERROR")),
    Case("stripe event id an operator",
         lambda v, f: get(f"/v1/stripe-events/{quoted(json.dumps({'$ne': None}))}"),
         Refused(404, "NOT_FOUND")),
    # ---- /v1/usage --------------------------------------------------------------------------
    Case("usage not JSON", lambda v, f: raw_usage(b"{org_id: acme"),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage as text/plain",
         lambda v, f: raw_usage(json.dumps({"org_id": v.org, "run_id": "r"}).encode(),
                                "text/plain"),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage body a list", lambda v, f: usage([v.org, "run"]), Refused(422, "VALIDATION_ERROR")),
    Case("usage body of 2 MiB",
         lambda v, f: usage({"org_id": "o" * TWO_MIB, "run_id": "r"}),
         Refused(413, "PAYLOAD_TOO_LARGE")),
    Case("usage without run_id", lambda v, f: usage({"org_id": v.org, "units": 1}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage for an operator org id", lambda v, f: usage({"org_id": {"$gt": ""}, "run_id": "r"}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage for a 10 KB org id", lambda v, f: usage({"org_id": TEN_KB, "run_id": "r"}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage for an unknown org",
         lambda v, f: usage({"org_id": new_id("org"), "run_id": "r", "units": 5}),
         Refused(404, "ORG_NOT_FOUND")),
    Case("usage run_id an operator",
         lambda v, f: usage({"org_id": v.org, "run_id": {"$ne": None}, "units": 1}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage step $where",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "step": "$where", "units": 1}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage with an operator field",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "$where": "1"}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage cost key an operator",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "costs": {"$inc": 1}}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage cost key dotted",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "costs": {"a.b": 1}}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage units a string",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "units": "10"}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage units a fraction",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "units": 1.5}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage units negative",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "units": -1}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage units 10**30",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "units": 10**30}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage cost beyond any decimal",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "costs": {"llm": "9e999999"}}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage cost a word",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "costs": {"llm": "much"}}),
         Refused(422, "VALIDATION_ERROR")),
    Case("usage costs and units",
         lambda v, f: usage({"org_id": v.org, "run_id": "r", "costs": {"llm": 1}, "units": 1}),
         Refused(422, "VALIDATION_ERROR")),
]


# ---- fixtures and checks -----------------------------------------------------------------


def assert_error_format(response: httpx.Response, expect: Refused) -> None:
    assert response.status_code == expect.status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == expect.code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def send(api: httpx.AsyncClient, probe: Probe) -> httpx.Response:
    return await api.request(probe.method, probe.path, content=probe.content,
                             headers=probe.headers)


async def still_serving(api: httpx.AsyncClient, v: Victim) -> None:
    assert (await api.get("/healthz")).status_code == 200
    balance = await api.get(f"/v1/orgs/{v.org}/balance")
    assert balance.status_code == 200 and balance.json()["balance"] == v.balance
    view = (await api.get(f"/v1/orgs/{v.org}/subscription")).json()
    assert (view["stripe_customer_id"], view["plan_id"]) == (v.customer, "starter")


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_hostile_request(
    case: Case, api: httpx.AsyncClient, victim: Victim, stripe_fake: StripeFake,
    temporal_client: Client, db: Database,
) -> None:
    before = await snapshot(db)
    events_before = await db.stripe_events.count_documents({})
    made = case.make(victim, stripe_fake)
    expect = case.expect
    if isinstance(expect, Recorded):
        assert isinstance(made, dict)
        result = await recorded(api, temporal_client, made)
        notified = [f"notification {n}" for n in expect.notified]
        assert (result.outcome, result.written) == (expect.outcome, notified), result
        assert result.org_id in (None, victim.org), result
        view = (await api.get(f"/v1/stripe-events/{made['id']}")).json()
        assert (view["status"], view["outcome"]) == ("COMPLETED", expect.outcome)
        assert await db.stripe_events.count_documents({}) == events_before + 1
    else:
        assert isinstance(made, Probe)
        response = await send(api, made)
        if isinstance(expect, Ignored):
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ignored", "workflow_id": None}
        else:
            assert_error_format(response, expect)
        assert await db.stripe_events.count_documents({}) == events_before
    after = await snapshot(db)
    if isinstance(expect, Recorded) and expect.notified:
        assert after.pop("notifications") == before.pop("notifications") + len(expect.notified)
    assert after == before
    await still_serving(api, victim)


async def test_server_keeps_serving_after_the_whole_corpus_at_once(
    api: httpx.AsyncClient, victim: Victim, stripe_fake: StripeFake, temporal_client: Client,
    db: Database, org: str,
) -> None:
    """Every request the receiver or `/v1` refuses by itself, three times over, concurrently;
    then ordinary requests still work."""
    probes = [case.make(victim, stripe_fake) for case in CASES
              if not isinstance(case.expect, Recorded)] * 3
    before = await snapshot(db)
    responses = await asyncio.gather(*(send(api, p) for p in probes if isinstance(p, Probe)))
    assert len(responses) == len(probes)
    assert all(400 <= r.status_code < 500 or r.json()["status"] == "ignored" for r in responses)
    assert await snapshot(db) == before
    await still_serving(api, victim)

    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    used = await api.post("/v1/usage", json={"org_id": org, "run_id": "after-corpus", "units": 7})
    assert (used.status_code, used.json()["balance"]) == (200, 493)
    bought = event("payment_intent.succeeded", payment_intent(pi=new_id("pi"),
                                                              meta=metadata(org, PACK)))
    assert (await recorded(api, temporal_client, bought)).outcome == "applied"
    assert (await api.get(f"/v1/orgs/{org}/balance")).json()["balance"] == 493 + 500000


async def test_non_finite_negative_and_huge_costs_are_metered_as_specified(
    api: httpx.AsyncClient, org: str
) -> None:
    """SPEC §5.2: no positive finite cost -> 0 units (`zero_cost`, recorded); a cost too large
    for its week is capped at `max_units_per_operation`. JSON's NaN and Infinity are numbers to
    Python's parser, so they are costs like any other."""
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    for run, raw in [("nan", b"NaN"), ("inf", b"Infinity"), ("neg-inf", b"-Infinity"),
                     ("negative", b"-3.5"), ("zero", b"0")]:
        body = b'{"org_id": "%s", "run_id": "%s", "costs": {"llm": %s}}' % (
            org.encode(), run.encode(), raw)
        response = await api.post("/v1/usage", content=body,
                                  headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        assert (response.json()["units"], response.json()["balance"]) == (0, 500), run
    huge = await api.post("/v1/usage", json={"org_id": org, "run_id": "huge",
                                             "costs": {"llm": 1e308, "search": 10**30}})
    assert huge.status_code == 200, huge.text
    assert (huge.json()["units"], huge.json()["balance"]) == (10000, 500 - 10000)
    entries = (await api.get(f"/v1/orgs/{org}/ledger")).json()["entries"]
    assert [(e["kind"], e["amount"]) for e in entries] == [("debit", -10000), ("grant", 500)]


async def test_a_refund_beyond_64_bits_fails_at_once_and_writes_nothing(
    api: httpx.AsyncClient, stripe_worker: Any, temporal_client: Client, db: Database, org: str
) -> None:
    """A signed refund of 10**30 cents against a real purchase cannot be stored: the workflow
    fails at the first attempt (a retry cannot fix it) and the transaction leaves no trace."""
    pi, ch = new_id("pi"), new_id("ch")
    bought = event("payment_intent.succeeded",
                   payment_intent(pi=pi, meta=metadata(org, PACK), charge=ch))
    assert (await recorded(api, temporal_client, bought)).outcome == "applied"
    lot_before = await db.lots.find_one({"org_id": org, "payment_intent": pi})
    evt = event("refund.created", refund(charge=ch, pi=pi, amount=10**30))
    assert (await deliver(api, evt)).json()["status"] == "started"
    handle = temporal_client.get_workflow_handle(f"stripe-{evt['id']}",
                                                 result_type=StripeEventOutcome)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = step_error(failure.value.cause)
    assert (cause.type, cause.non_retryable) == ("MALFORMED_STRIPE_OBJECT", True)
    assert (await activity_attempts(handle))["apply_stripe_refunds"] == 1
    assert await db.lots.find_one({"org_id": org, "payment_intent": pi}) == lot_before
    assert await db.ledger.count_documents({"org_id": org}) == 1
    assert await db.stripe_events.find_one({"_id": evt["id"]}) is None
