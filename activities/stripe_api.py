"""Stripe API reads (SPEC §5.5): what a webhook payload does not carry.

Every read goes through `stripe.StripeClient` at `STRIPE_API_BASE` when it is set (a local fake in
tests). The SDK's own network retries are off: Temporal retries the activity instead, so the
attempts are visible in the workflow history. An error that retrying cannot fix (404, invalid
request, bad key) is non-retryable; network errors, 429 and 5xx retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any, TypeVar

import stripe
from temporalio import activity
from temporalio.exceptions import ApplicationError

from billing.config import Settings
from billing.models import (
    EventListQuery,
    PurchaseFacts,
    PurchaseQuery,
    StripeEvent,
    StripeEventPage,
)
from billing.stripe.objects import expanded, org_from, pack_from
from billing.stripe_client import StripeNotConfigured, stripe_client

T = TypeVar("T")
Obj = dict[str, Any]


def _retryable(exc: stripe.StripeError) -> bool:
    status = exc.http_status
    return status is None or status == 429 or status >= 500


@asynccontextmanager
async def _stripe_errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except stripe.StripeError as exc:
        if _retryable(exc):
            raise
        raise ApplicationError(
            f"Stripe refused {what}: {exc.user_message or exc}",
            type=f"STRIPE_{exc.http_status}",
            non_retryable=True,
        ) from exc


class StripeApiActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def client(self) -> stripe.StripeClient:
        try:
            return stripe_client(self.settings)
        except StripeNotConfigured as exc:
            raise ApplicationError(exc.message, type=exc.code, non_retryable=True) from exc

    async def _read(self, what: str, call: Callable[[], Awaitable[stripe.StripeObject]]) -> Obj:
        async with _stripe_errors(what):
            found = await call()
        return found.to_dict()

    async def _list(self, what: str, first: Callable[[], Awaitable[Any]]) -> list[Obj]:
        async with _stripe_errors(what):
            page = await first()
            return [item.to_dict() async for item in page.auto_paging_iter()]

    @activity.defn(name="stripe_retrieve_subscription")
    async def retrieve_subscription(self, subscription_id: str) -> Obj:
        return await self._read(
            f"subscription {subscription_id}",
            lambda: self.client.v1.subscriptions.retrieve_async(subscription_id),
        )

    @activity.defn(name="stripe_retrieve_payment_intent")
    async def retrieve_payment_intent(self, payment_intent_id: str) -> Obj:
        return await self._read(
            f"payment intent {payment_intent_id}",
            lambda: self.client.v1.payment_intents.retrieve_async(payment_intent_id),
        )

    @activity.defn(name="stripe_retrieve_charge")
    async def retrieve_charge(self, charge_id: str) -> Obj:
        return await self._read(
            f"charge {charge_id}", lambda: self.client.v1.charges.retrieve_async(charge_id)
        )

    @activity.defn(name="stripe_retrieve_event")
    async def retrieve_event(self, event_id: str) -> StripeEvent:
        """An event as Stripe keeps it (the last 30 days), shaped like a webhook delivery."""
        return _event(await self._read(f"event {event_id}",
                                       lambda: self.client.v1.events.retrieve_async(event_id)))

    @activity.defn(name="stripe_list_refunds")
    async def list_refunds(self, charge_id: str) -> list[Obj]:
        """Every refund of a charge (a `charge.refunded` payload carries them only expanded)."""
        return await self._list(
            f"the refunds of {charge_id}",
            lambda: self.client.v1.refunds.list_async({"charge": charge_id, "limit": 100}),
        )

    @activity.defn(name="stripe_list_line_items")
    async def list_line_items(self, session_id: str) -> list[Obj]:
        return await self._list(
            f"the line items of {session_id}",
            lambda: self.client.v1.checkout.sessions.line_items.list_async(
                session_id, {"limit": 100}
            ),
        )

    async def invoice_lines(self, invoice_id: str) -> list[Obj]:
        """Every line of an invoice (its payload carries the first page only)."""
        return await self._list(
            f"the lines of {invoice_id}",
            lambda: self.client.v1.invoices.line_items.list_async(invoice_id, {"limit": 100}),
        )

    async def invoice_payments(self, invoice_id: str) -> list[Obj]:
        """The payments of an invoice (API versions from 2025-03-31 keep the payment intent and
        charge there, not on the invoice)."""
        return await self._list(
            f"the payments of {invoice_id}",
            lambda: self.client.v1.invoice_payments.list_async(
                {"invoice": invoice_id, "limit": 100}),
        )

    @activity.defn(name="stripe_find_checkout_sessions")
    async def find_checkout_sessions(self, payment_intent_id: str) -> list[Obj]:
        """The Checkout sessions that took a payment intent (at most one in practice).

        Stripe answers an empty list when there is none; a Stripe-compatible server without
        Checkout (`localstripe` in `billing dev`) answers 404, which means the same."""
        try:
            return await self._list(
                f"the Checkout sessions of {payment_intent_id}",
                lambda: self.client.v1.checkout.sessions.list_async(
                    {"payment_intent": payment_intent_id, "limit": 10}
                ),
            )
        except ApplicationError as exc:
            if exc.type == "STRIPE_404":
                return []
            raise

    async def purchase_facts(self, payment_intent: str | None, *, session: Obj | None = None,
                             intent: Obj | None = None,
                             charge: Obj | None = None) -> PurchaseFacts:
        """What Stripe holds about a payment: its payment intent, the Checkout session that took
        it (found through the API when not given) and that session's line items (always listed:
        they carry the quantities)."""
        if session is None and payment_intent is not None:
            sessions = await self.find_checkout_sessions(payment_intent)
            session = next((s for s in sessions if s.get("mode") == "payment"), None)
        if intent is None and payment_intent is not None and not (
                session is not None and org_from(session) and pack_from(session)):
            intent = expanded((session or {}).get("payment_intent")) or (
                await self.retrieve_payment_intent(payment_intent))
        line_items = None
        if session is not None:
            line_items = await self.list_line_items(str(session["id"]))
        return PurchaseFacts(payment_intent=payment_intent, session=session,
                             line_items=line_items, intent=intent, charge=charge)

    @activity.defn(name="stripe_purchase_facts")
    async def read_purchase_facts(self, query: PurchaseQuery) -> PurchaseFacts:
        """The purchase behind a refunded or disputed charge; a payment intent Stripe does not
        know (404) leaves the purchase undetermined rather than failing the event."""
        try:
            return await self.purchase_facts(query.payment_intent, charge=query.charge)
        except ApplicationError as exc:
            if exc.type == "STRIPE_404":
                return PurchaseFacts(charge=query.charge)
            raise

    async def list_events(self, query: EventListQuery) -> StripeEventPage:
        """One page of events created since `created_gte`, newest first; page on with
        `starting_after` = the last event's id while `has_more` (read by the reconciliation's
        `reconcile_missed_events` activity)."""
        params: dict[str, Any] = {"created": {"gte": query.created_gte}, "types": query.types,
                                  "limit": query.limit}
        if query.starting_after is not None:
            params["starting_after"] = query.starting_after
        async with _stripe_errors("the event list"):
            page = await self.client.v1.events.list_async(params)  # type: ignore[arg-type]
        return StripeEventPage(
            events=[_event(item.to_dict()) for item in page.data], has_more=bool(page.has_more)
        )


def _event(obj: Obj) -> StripeEvent:
    """An API event in the shape the webhook receiver passes to `StripeEventWorkflow`."""
    try:
        return StripeEvent.from_stripe(obj)
    except ValueError as exc:
        raise ApplicationError(f"malformed event {obj.get('id')}: {exc!r}",
                               type="MALFORMED_STRIPE_OBJECT", non_retryable=True) from exc
