"""`/v1/orgs/{org}/checkout` and `/v1/orgs/{org}/billing-portal`: purchases the engine starts
(SPEC §5.9)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from fastapi import Header
from pydantic import BaseModel, ConfigDict, Field, model_validator

from billing.checkout import MAX_QUANTITY, CheckoutRequest
from billing.config import HttpUrl
from starter.api.deps import StateDep, v1_router
from starter.api.errors import ErrorResponse
from starter.operations.checkout import billing_portal, start_checkout

router = v1_router(
    tags=["purchases"],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        404: {"model": ErrorResponse, "description": "organization not registered"},
        422: {"model": ErrorResponse, "description": "invalid body: UNKNOWN_PACK, UNKNOWN_PLAN,"
              " a quantity outside 1-100 or a URL that is not absolute http(s)"},
        502: {"model": ErrorResponse, "description": "STRIPE_REFUSED: Stripe refused the call"},
        503: {"model": ErrorResponse, "description": "STRIPE_UNAVAILABLE: Stripe cannot be "
              "reached; retry (with the same Idempotency-Key)"},
    },
)


Url = Annotated[HttpUrl, Field(max_length=2048)]


class CheckoutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pack_id: str | None = Field(None, max_length=64, description="a pack of `[[packs]]`")
    quantity: int = Field(1, ge=1, le=MAX_QUANTITY, description="packs to buy (pack only)")
    plan_id: str | None = Field(None, max_length=64,
                                description="a plan of `[[plans]]` (instead of a pack)")
    success_url: Url | None = Field(
        None, description="where Stripe sends the customer after paying; default "
        "`[checkout] success_url`")
    cancel_url: Url | None = Field(
        None, description="where Stripe sends a customer who goes back; default "
        "`[checkout] cancel_url`")

    @model_validator(mode="after")
    def _one_product(self) -> Self:
        if (self.pack_id is None) == (self.plan_id is None):
            raise ValueError("give either pack_id or plan_id")
        if self.plan_id is not None and self.quantity != 1:
            raise ValueError("quantity is for packs only")
        return self


class CheckoutAnswer(BaseModel):
    checkout_id: str = Field(description="the engine's checkout record (`co_...`); the "
                             "session's `client_reference_id`")
    url: str = Field(description="the Stripe Checkout page to send the customer to")
    expires_at: datetime = Field(description="when the Checkout Session expires")
    pack_id: str | None = None
    quantity: int | None = Field(None, description="packs bought (pack only)")
    plan_id: str | None = None
    units: int | None = Field(None, description="units credited once paid (pack only)")
    lot_expires_at_most_days: int | None = Field(
        None, description="days the credited units last from payment at most (pack only; "
        "null: they never expire)")


class PortalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    return_url: Url | None = Field(
        None, description="where the portal's back link goes; default `[checkout] cancel_url`")


class PortalAnswer(BaseModel):
    url: str = Field(description="the Stripe billing portal session to send the customer to")


IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255,
           description="a retried request with the same key answers the same session"),
]


@router.post("/orgs/{org}/checkout", response_model=CheckoutAnswer,
             summary="Start a purchase: a Stripe Checkout URL for a pack or a plan",
             responses={409: {"model": ErrorResponse, "description":
                              "ALREADY_SUBSCRIBED (plan changes go through the billing portal) "
                              "or IDEMPOTENCY_KEY_REUSED (the key named another request)"}})
async def checkout(org: str, body: CheckoutBody, state: StateDep,
                   idempotency_key: IdempotencyKey = None) -> CheckoutAnswer:
    """Makes sure the organization has a Stripe customer, writes a checkout record and creates
    the Checkout Session. The record decides what the payment credits, whatever the session's
    metadata says by the time its events arrive."""
    runtime = state.runtime
    request = CheckoutRequest(org_id=org, pack_id=body.pack_id, plan_id=body.plan_id,
                              quantity=body.quantity, success_url=body.success_url,
                              cancel_url=body.cancel_url)
    started = await start_checkout(runtime, lambda: state.stripe, request, idempotency_key)
    extra: dict[str, Any] = {"plan_id": body.plan_id}
    if body.pack_id is not None:
        pack = runtime.config.packs_by_id[body.pack_id]
        extra = {"pack_id": pack.id, "quantity": body.quantity,
                 "units": pack.units * body.quantity,
                 "lot_expires_at_most_days": pack.expiry_days}
    return CheckoutAnswer(checkout_id=started.checkout_id, url=started.url,
                          expires_at=started.expires_at, **extra)


@router.post("/orgs/{org}/billing-portal", response_model=PortalAnswer,
             summary="A Stripe billing portal URL for the organization's customer",
             responses={409: {"model": ErrorResponse,
                              "description": "NO_CUSTOMER: the organization has no Stripe "
                              "customer yet"}})
async def portal(org: str, state: StateDep, body: PortalBody | None = None) -> PortalAnswer:
    """Payment methods, invoices and plan changes, on Stripe's page."""
    url = await billing_portal(state.runtime, lambda: state.stripe, org,
                               body.return_url if body else None)
    return PortalAnswer(url=url)
