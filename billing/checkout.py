"""Purchases the engine starts (SPEC §5.9), as plain data: which checkout record a request
names, whether it may be sold, and the Checkout Session the engine asks Stripe for.

The record, not the session's metadata, later decides what a payment bought (SPEC §5.5): the
session carries the record's id (`client_reference_id`) so that every event of the purchase
finds it, whatever a merchant integration adds to or strips from the metadata.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from billing.config import BillingConfig, PackConfig, PlanConfig
from billing.errors import BillingError
from billing.stripe.subscriptions import is_live

#: A checkout record's id: `co_` and 24 hex digits, as `checkout_id` makes them.
CHECKOUT_ID = re.compile(r"^co_[0-9a-f]{24}$")
MAX_QUANTITY = 100


class UnknownPack(BillingError):
    status = 422
    code = "UNKNOWN_PACK"


class UnknownPlan(BillingError):
    status = 422
    code = "UNKNOWN_PLAN"


class AlreadySubscribed(BillingError):
    status = 409
    code = "ALREADY_SUBSCRIBED"


class IdempotencyKeyReused(BillingError):
    status = 409
    code = "IDEMPOTENCY_KEY_REUSED"


@dataclass(frozen=True)
class CheckoutRequest:
    """What the app asked for; URLs are None where it left the `[checkout]` defaults."""

    org_id: str
    pack_id: str | None = None
    plan_id: str | None = None
    quantity: int = 1
    success_url: str | None = None
    cancel_url: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)


def checkout_id(org_id: str, idempotency_key: str | None) -> str:
    """The record's id. With an `Idempotency-Key` it is derived from the key (scoped to the
    organization), so a retried request finds the record its first attempt wrote, even when that
    attempt died before Stripe answered; without one it is new.

    >>> checkout_id("acme", "k1") == checkout_id("acme", "k1") != checkout_id("globex", "k1")
    True
    >>> bool(CHECKOUT_ID.match(checkout_id("acme", None)))
    True
    """
    if idempotency_key is None:
        return f"co_{secrets.token_hex(12)}"
    digest = hashlib.sha256(f"{org_id}\n{idempotency_key}".encode()).hexdigest()
    return f"co_{digest[:24]}"


def same_request(stored: dict[str, Any], request: CheckoutRequest) -> None:
    """A key names one request: another body under the same key is refused, never served the
    first request's session (Stripe refuses the same way)."""
    if stored != request.to_doc():
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for another checkout request; use a new key")


def pack_for_sale(config: BillingConfig, pack_id: str) -> PackConfig:
    pack = config.packs_by_id.get(pack_id)
    if pack is None:
        raise UnknownPack(f"unknown pack {pack_id!r}")
    if not pack.stripe_price_ids:
        raise UnknownPack(f"pack {pack_id!r} has no stripe_price_ids: it cannot be sold")
    return pack


def plan_for_sale(config: BillingConfig, plan_id: str, *, current_plan: str | None,
                  subscription_status: str | None) -> PlanConfig:
    """A plan the organization may subscribe to through Checkout: a priced plan it is not on,
    while it has no live subscription (a second one would bill it twice; plan changes go
    through the billing portal).

    >>> from billing.config import load_config
    >>> config = load_config()
    >>> plan_for_sale(config, "pro", current_plan="free", subscription_status=None).id
    'pro'
    >>> plan_for_sale(config, "pro", current_plan="starter", subscription_status="active")
    Traceback (most recent call last):
    ...
    billing.checkout.AlreadySubscribed: organization already has a live subscription ...
    """
    plan = config.plans_by_id.get(plan_id)
    if plan is None:
        raise UnknownPlan(f"unknown plan {plan_id!r}")
    if current_plan == plan_id:
        raise AlreadySubscribed(f"the organization is already on plan {plan_id!r}")
    if not plan.stripe_price_ids:
        raise UnknownPlan(f"plan {plan_id!r} has no stripe_price_ids: it cannot be sold")
    if is_live(subscription_status):
        raise AlreadySubscribed(
            f"organization already has a live subscription ({subscription_status}) on plan "
            f"{current_plan!r}: change plans through the billing portal")
    return plan


def session_params(config: BillingConfig, request: CheckoutRequest, record_id: str,
                   customer: str) -> dict[str, Any]:
    """The Checkout Session for a record: the first configured price of the pack or plan, the
    record's id as `client_reference_id`, and the engine's metadata on the session and on what
    the session creates (its payment intent or its subscription)."""
    metadata = {"org_id": request.org_id, "checkout_id": record_id}
    params: dict[str, Any] = {
        "customer": customer,
        "client_reference_id": record_id,
        "success_url": request.success_url or config.checkout.success_url,
        "cancel_url": request.cancel_url or config.checkout.cancel_url,
    }
    if request.pack_id is not None:
        pack = config.packs_by_id[request.pack_id]
        metadata["pack_id"] = pack.id
        return {**params, "mode": "payment", "metadata": metadata,
                "line_items": [{"price": pack.stripe_price_ids[0],
                                "quantity": request.quantity}],
                "payment_intent_data": {"metadata": metadata}}
    assert request.plan_id is not None
    plan = config.plans_by_id[request.plan_id]
    metadata["plan_id"] = plan.id
    return {**params, "mode": "subscription", "metadata": metadata,
            "line_items": [{"price": plan.stripe_price_ids[0], "quantity": 1}],
            "subscription_data": {"metadata": metadata}}


def checkout_named(*objects: dict[str, Any] | None) -> str | None:
    """The engine's checkout record a Stripe object names: a `client_reference_id` of the
    record's form, else `metadata.checkout_id` (a key only the engine sets), first found.

    >>> checkout_named({"client_reference_id": "user-42", "metadata": {}}) is None
    True
    >>> checkout_named(None, {"metadata": {"checkout_id": "co_x"}})
    'co_x'
    """
    for obj in objects:
        if not obj:
            continue
        reference = obj.get("client_reference_id")
        if isinstance(reference, str) and CHECKOUT_ID.match(reference):
            return reference
        metadata = obj.get("metadata")
        named = metadata.get("checkout_id") if isinstance(metadata, dict) else None
        if isinstance(named, str) and named.strip():
            return named.strip()
    return None
