"""Starting a purchase (SPEC §5.9): the organization's Stripe customer, the checkout record,
then the Checkout Session; and billing portal sessions.

Every write is idempotent, so a request that died anywhere is completed by its retry: the
customer is created under the key `customer-<org>` and linked once, the record's id comes from
the request's `Idempotency-Key`, and the session is created under `checkout-<checkout_id>`, so
Stripe answers a retry with the session it already made.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe

from billing.checkout import (
    CheckoutRequest,
    checkout_id,
    pack_for_sale,
    plan_for_sale,
    same_request,
    session_params,
)
from billing.clock import utcnow
from billing.errors import BillingError
from billing.runtime import Runtime
from billing.store.database import Doc
from billing.store.subscriptions import linked_customer


class StripeUnavailable(BillingError):
    status = 503
    code = "STRIPE_UNAVAILABLE"


class StripeRefused(BillingError):
    status = 502
    code = "STRIPE_REFUSED"


class NoCustomer(BillingError):
    status = 409
    code = "NO_CUSTOMER"


@dataclass(frozen=True)
class CheckoutStarted:
    checkout_id: str
    url: str
    expires_at: datetime
    request: CheckoutRequest


@asynccontextmanager
async def stripe_calls(what: str) -> AsyncIterator[None]:
    """Stripe down, slow or rate limiting: 503, so the app retries (nothing is half-written:
    the retry completes what was written). Any other refusal is Stripe's word: 502 with it."""
    try:
        yield
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is None or status == 429 or status >= 500:
            raise StripeUnavailable(f"Stripe is unavailable ({what}): retry later") from exc
        raise StripeRefused(f"Stripe refused {what}: {exc.user_message or exc}") from exc


#: The Stripe client, made on first use: a request refused before it reaches Stripe (an unknown
#: organization or pack) is refused for that reason, even where Stripe is not configured.
StripeSource = Callable[[], stripe.StripeClient]


async def ensure_customer(runtime: Runtime, client: StripeSource, org_id: str) -> str:
    """The organization's linked customer; one is created (`metadata.org_id`, idempotency key
    `customer-<org>`) and linked when there is none."""
    customer = await linked_customer(runtime.db, org_id)
    if customer is not None:
        return customer
    async with stripe_calls(f"a customer for {org_id}"):
        created = await client().v1.customers.create_async(
            {"metadata": {"org_id": org_id}}, {"idempotency_key": f"customer-{org_id}"})
    return await runtime.subscriptions.link_customer(org_id, created.id, utcnow())


async def _check_for_sale(runtime: Runtime, request: CheckoutRequest, account: Doc) -> None:
    config = runtime.config
    if request.pack_id is not None:
        pack_for_sale(config, request.pack_id)
        return
    assert request.plan_id is not None
    standing = await runtime.subscriptions.get(request.org_id) or {}
    plan_for_sale(config, request.plan_id, current_plan=account.get("plan_id"),
                  subscription_status=standing.get("status"))


def _started(record: Doc, request: CheckoutRequest) -> CheckoutStarted:
    expires_at = record["expires_at"]
    return CheckoutStarted(checkout_id=record["_id"], url=record["url"],
                           expires_at=expires_at.astimezone(UTC), request=request)


async def start_checkout(runtime: Runtime, client: StripeSource,
                         request: CheckoutRequest, idempotency_key: str | None) -> CheckoutStarted:
    """A Checkout Session for the request. A request repeating an `Idempotency-Key` answers
    the first one's session (completing it when the first attempt died before Stripe answered);
    the refusals are checked for a new request only, since a retry's first attempt may itself
    have made the organization a subscriber."""
    account = await runtime.accounts.get(request.org_id)
    record_id = checkout_id(request.org_id, idempotency_key)
    record = await runtime.checkouts.get(record_id)
    if record is not None:
        same_request(record["request"], request)
        if record.get("url"):
            return _started(record, request)
    else:
        await _check_for_sale(runtime, request, account)
    customer = await ensure_customer(runtime, client, request.org_id)
    if record is None:
        record = await runtime.checkouts.open(record_id, request, customer, utcnow())
        same_request(record["request"], request)
    params = session_params(runtime.config, request, record_id, record["customer"])
    async with stripe_calls(f"a Checkout Session for {record_id}"):
        made = await client().v1.checkout.sessions.create_async(
            params,  # type: ignore[arg-type]
            {"idempotency_key": f"checkout-{record_id}"})
    session: dict[str, Any] = made.to_dict()
    expires_at = datetime.fromtimestamp(int(session["expires_at"]), UTC)
    await runtime.checkouts.attach_session(record_id, session_id=str(session["id"]),
                                           url=str(session["url"]), expires_at=expires_at)
    return CheckoutStarted(checkout_id=record_id, url=str(session["url"]), expires_at=expires_at,
                           request=request)


async def billing_portal(runtime: Runtime, client: StripeSource, org_id: str,
                         return_url: str | None) -> str:
    """A billing portal session's URL for the organization's customer (`NO_CUSTOMER` when none
    is linked: it has bought nothing through Stripe yet)."""
    await runtime.accounts.get(org_id)
    customer = await linked_customer(runtime.db, org_id)
    if customer is None:
        raise NoCustomer(f"organization {org_id!r} has no Stripe customer yet: it buys through "
                         "POST /v1/orgs/{org}/checkout first")
    async with stripe_calls(f"a billing portal session for {org_id}"):
        made = await client().v1.billing_portal.sessions.create_async(
            {"customer": customer,
             "return_url": return_url or runtime.config.checkout.cancel_url})
    return str(made.url)
