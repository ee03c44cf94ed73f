"""Stripe webhook payloads built from Stripe's published example objects, signed like Stripe.

`fixtures3.json` (SPEC: `../shared/stripe-fixtures/`) holds one example of every API object; each
builder takes that object, overrides what a test needs and wraps it in an event envelope.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import httpx

Obj = dict[str, Any]

FIXTURES = Path(os.environ.get(
    "STRIPE_FIXTURES",
    Path(__file__).resolve().parents[2] / "shared" / "stripe-fixtures" / "fixtures3.json",
))
PRIMARY_SECRET = "whsec_test_primary"
ROTATED_SECRET = "whsec_test_rotated"
PACK_PRICE = "price_pack_500k"


@cache
def _resources() -> Obj:
    resources: Obj = json.loads(FIXTURES.read_text(encoding="utf-8"))["resources"]
    return resources


def resource(name: str, **overrides: Any) -> Obj:
    obj: Obj = copy.deepcopy(_resources()[name])
    obj.update(overrides)
    return obj


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def event(type: str, obj: Obj, *, created: int | None = None, event_id: str | None = None) -> Obj:
    envelope = resource("event", id=event_id or new_id("evt"), type=type,
                        created=created if created is not None else int(time.time()),
                        api_version="2025-09-30.clover")
    envelope["data"] = {"object": obj, "previous_attributes": {}}
    return envelope


def sign(body: bytes, secret: str = PRIMARY_SECRET, timestamp: int | None = None) -> str:
    """`t=<unix>,v1=<hex hmac-sha256 of "<t>.<body>">`, as Stripe signs."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


async def deliver(api: httpx.AsyncClient, evt: Obj, *, secret: str = PRIMARY_SECRET,
                  timestamp: int | None = None) -> httpx.Response:
    body = json.dumps(evt).encode()
    return await api.post("/stripe/webhook", content=body, headers={
        "Stripe-Signature": sign(body, secret, timestamp), "Content-Type": "application/json"})


# ---- objects ---------------------------------------------------------------------------------


def metadata(org: str | None, pack: str | None = None, *, seed_spelling: bool = False) -> Obj:
    meta: Obj = {}
    if org is not None:
        meta["organizationId" if seed_spelling else "org_id"] = org
    if pack is not None:
        meta["packId" if seed_spelling else "pack_id"] = pack
    return meta


def checkout_session(*, payment_intent: str | None, meta: Obj, amount: int = 4900,
                     paid: bool = True, mode: str = "payment", customer: str | None = None,
                     subscription: str | None = None) -> Obj:
    return resource(
        "checkout.session", id=new_id("cs_test"), mode=mode, payment_intent=payment_intent,
        payment_status="paid" if paid else "unpaid", status="complete", amount_total=amount,
        amount_subtotal=amount, currency="usd", metadata=meta, customer=customer,
        subscription=subscription,
    )


def payment_intent(*, pi: str, meta: Obj, amount: int = 4900, charge: str | None = None) -> Obj:
    return resource("payment_intent", id=pi, amount=amount, amount_received=amount,
                    status="succeeded", metadata=meta, latest_charge=charge, canceled_at=None)


def refund(*, charge: str, pi: str | None, amount: int, status: str = "succeeded") -> Obj:
    return resource("refund", id=new_id("re"), charge=charge, payment_intent=pi, amount=amount,
                    status=status)


def charge(*, ch: str, pi: str | None, amount: int = 4900, meta: Obj | None = None,
           refunds: list[Obj] | None = None, customer: str | None = None) -> Obj:
    """A refunded charge; `refunds=None` leaves them unexpanded (listed through the API)."""
    obj = resource("charge", id=ch, payment_intent=pi, amount=amount, metadata=meta or {},
                   amount_refunded=sum(r["amount"] for r in refunds or []), refunded=True,
                   customer=customer)
    if refunds is None:
        obj.pop("refunds", None)
    else:
        obj["refunds"] = {"object": "list", "data": refunds, "has_more": False,
                          "url": f"/v1/charges/{ch}/refunds"}
    return obj


def dispute(*, dp: str, ch: str, pi: str | None, amount: int, status: str) -> Obj:
    return resource("dispute", id=dp, charge=ch, payment_intent=pi, amount=amount, status=status)


def subscription(*, sub: str, customer: str, price: str, status: str = "active",
                 meta: Obj | None = None, period_start: int = 1_780_000_000) -> Obj:
    obj = resource("subscription", id=sub, customer=customer, status=status,
                   metadata=meta or {})
    item = obj["items"]["data"][0]
    item["price"]["id"] = price
    item["subscription"] = sub
    item["current_period_start"] = period_start
    return obj


def invoice(*, customer: str, sub: str | None, meta: Obj | None = None) -> Obj:
    obj = resource("invoice", id=new_id("in"), customer=customer, subscription=None,
                   status="open", metadata={})
    obj["parent"] = {"type": "subscription_details", "quote_details": None,
                     "subscription_details": {"subscription": sub, "metadata": meta}}
    return obj
