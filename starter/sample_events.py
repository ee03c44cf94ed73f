"""Signed sample Stripe events for `billing send-test-event`: the whole path without Stripe.

The samples carry the organization and pack in metadata, so a purchase or a subscription needs
no Stripe API read; a refund or a dispute names `--payment-intent` to refer to an earlier sample
purchase (a fresh id makes it `unresolved`, which is visible too).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import stripe

from billing.config import BillingConfig
from billing.stripe.events import HANDLED_TYPES

Obj = dict[str, Any]

SAMPLE_TYPES = tuple(sorted(HANDLED_TYPES))


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(8)}"


def sample_object(
    event_type: str,
    config: BillingConfig,
    *,
    org: str,
    pack_id: str | None = None,
    payment_intent: str | None = None,
    now: int,
) -> Obj:
    """A minimal Stripe object of the shape the event type carries."""
    if event_type not in HANDLED_TYPES:
        raise ValueError(f"no sample for {event_type}: choose one of {', '.join(SAMPLE_TYPES)}")
    pack = config.packs_by_id.get(pack_id) if pack_id else (config.packs or (None,))[0]
    if pack_id and pack is None:
        raise ValueError(f"unknown pack {pack_id!r}")
    cents = pack.price_cents if pack else 1000
    metadata: Obj = {"org_id": org, **({"pack_id": pack.id} if pack else {})}
    pi = payment_intent or _id("pi")
    charge = _id("ch")
    customer = f"cus_test_{org}"
    subscription = f"sub_test_{org}"
    paid_plan = next((p for p in config.plans if p.stripe_price_ids), config.default_plan)
    price = paid_plan.stripe_price_ids[0] if paid_plan.stripe_price_ids else "price_unknown"
    if event_type == "checkout.session.completed":
        return {"id": _id("cs"), "object": "checkout.session", "mode": "payment",
                "payment_status": "paid", "status": "complete", "payment_intent": pi,
                "amount_total": cents, "currency": "usd", "customer": None, "metadata": metadata}
    if event_type == "payment_intent.succeeded":
        return {"id": pi, "object": "payment_intent", "amount": cents, "amount_received": cents,
                "currency": "usd", "status": "succeeded", "latest_charge": charge,
                "metadata": metadata}
    if event_type.startswith("customer.subscription."):
        deleted = event_type.endswith("deleted")
        return {"id": subscription, "object": "subscription", "customer": customer,
                "status": "canceled" if deleted else "active", "metadata": {"org_id": org},
                "items": {"object": "list", "has_more": False, "data": [
                    {"id": _id("si"), "price": {"id": price}, "quantity": 1,
                     "current_period_start": now}]}}
    if event_type == "customer.deleted":
        return {"id": customer, "object": "customer", "metadata": {"org_id": org}}
    if event_type.startswith("invoice."):
        return {"id": _id("in"), "object": "invoice", "customer": customer, "amount_due": cents,
                "attempt_count": 1, "status": "open" if "failed" in event_type else "paid",
                "parent": {"type": "subscription_details", "subscription_details": {
                    "subscription": subscription, "metadata": {"org_id": org}}}}
    refund = {"id": _id("re"), "object": "refund", "amount": cents, "charge": charge,
              "payment_intent": pi, "status": "succeeded", "metadata": {}}
    if event_type == "refund.created":
        return refund
    if event_type == "charge.refunded":
        return {"id": charge, "object": "charge", "amount": cents, "amount_refunded": cents,
                "payment_intent": pi, "refunded": True, "metadata": metadata,
                "refunds": {"object": "list", "has_more": False, "data": [refund]}}
    status = {"closed": "lost"}.get(event_type.rsplit(".", 1)[-1], "needs_response")
    return {"id": _id("dp"), "object": "dispute", "amount": cents, "charge": charge,
            "payment_intent": pi, "reason": "fraudulent", "status": status, "metadata": {}}


def sample_event(event_type: str, config: BillingConfig, *, org: str, pack_id: str | None = None,
                 payment_intent: str | None = None) -> Obj:
    now = int(time.time())
    obj = sample_object(event_type, config, org=org, pack_id=pack_id,
                        payment_intent=payment_intent, now=now)
    return {"id": _id("evt"), "object": "event", "api_version": "2025-09-30.clover",
            "created": now, "livemode": False, "type": event_type, "data": {"object": obj}}


def signed_body(event: Obj, secret: str) -> tuple[bytes, str]:
    """The body and its `Stripe-Signature` header, signed the way Stripe signs."""
    body = json.dumps(event)
    return body.encode(), stripe.WebhookSignature.generate_signature_header(body, secret)
