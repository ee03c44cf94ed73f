"""Automatic top-up activities (SPEC §5.8): the off-session charge on Stripe, then the record of
its outcome in one MongoDB transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import stripe
from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.errors import final_on_bad_input
from activities.stripe_api import StripeApiActivities, _stripe_errors
from billing.clock import utcnow
from billing.ledger import EntryKind
from billing.models import AutoTopUpCharge, AutoTopUpOrder, AutoTopUpResult
from billing.runtime import Runtime
from billing.store.auto_topups import SUCCEEDED
from billing.store.books import PENDING
from billing.store.database import Doc
from billing.store.documents import LotTerms
from billing.store.transactions import run_in_transaction
from billing.stripe.objects import amount, ref_id
from billing.stripe.purchases import Verdict, line_key, purchase_key, resolve_purchase

Obj = dict[str, Any]


class AutoTopUpActivities:
    def __init__(self, runtime: Runtime, stripe_api: StripeApiActivities) -> None:
        self.runtime = runtime
        self.stripe_api = stripe_api
        self.store = runtime.auto_topups

    @activity.defn(name="auto_topup_charge")
    async def charge(self, order: AutoTopUpOrder) -> AutoTopUpCharge:
        """Create and confirm the PaymentIntent off-session on the organization's customer and
        its default payment method, with the workflow id as Stripe idempotency key (a retried
        attempt gets the same PaymentIntent, never a second charge). A decline or a payment that
        needs the customer (`requires_action`) is an answer, not an error."""
        pack = self.runtime.config.packs_by_id.get(order.pack_id)
        if pack is None:
            return _failed(order, f"pack {order.pack_id!r} is no longer configured")
        customer = await self.store.customer_in(None, order.org_id)
        if customer is None:
            return _failed(order, "no linked Stripe customer")
        method = await self._payment_method(customer)
        if method is None:
            return _failed(order, f"customer {customer} has no payment method")
        client = self.stripe_api.client
        params: dict[str, Any] = {
            "amount": pack.price_cents, "currency": pack.currency, "customer": customer,
            "payment_method": method, "off_session": True, "confirm": True,
            "description": f"automatic top-up: pack {pack.id}",
            "metadata": {"org_id": order.org_id, "pack_id": pack.id,
                         "auto_topup": order.trigger_id},
        }
        async with _stripe_errors(f"the payment of {order.trigger_id}"):
            try:
                intent = await client.v1.payment_intents.create_async(
                    params,  # type: ignore[arg-type]
                    {"idempotency_key": order.trigger_id},
                )
            except stripe.CardError as exc:
                declined = exc.error.payment_intent if exc.error else None
                return _failed(order, str(exc.code or "card_error"),
                               declined.id if declined else None)
        found = intent.to_dict()
        if found.get("status") != "succeeded":
            return _failed(order, str(found.get("status")), ref_id(found.get("id")))
        return AutoTopUpCharge(order=order, succeeded=True, payment_intent=ref_id(found["id"]),
                               intent=found)

    async def _payment_method(self, customer: str) -> str | None:
        """The customer's `invoice_settings.default_payment_method`, else its first card."""
        client = self.stripe_api.client
        async with _stripe_errors(f"customer {customer}"):
            found = (await client.v1.customers.retrieve_async(customer)).to_dict()
            default = ref_id((found.get("invoice_settings") or {}).get(
                "default_payment_method"))
            if default:
                return default
            cards = await client.v1.payment_methods.list_async(
                {"customer": customer, "type": "card", "limit": 1})
        return ref_id(cards.data[0].id) if cards.data else None

    @activity.defn(name="auto_topup_record")
    async def record(self, charge: AutoTopUpCharge) -> AutoTopUpResult:
        """Close the top-up in one transaction: on success credit the pack under `payment:<pi>`
        as any purchase of it (so the `payment_intent.succeeded` webhook that follows is a
        duplicate, and refunds and disputes claw back from its lot); on failure count it and
        pause after three in a row. A top-up already closed answers with what it recorded."""
        order = charge.order
        now = utcnow()

        async def work(session: AsyncClientSession) -> AutoTopUpResult:
            trigger = await self.store.find_in(session, order.trigger_id)
            if trigger["status"] != PENDING:
                return AutoTopUpResult(
                    trigger_id=order.trigger_id, outcome=trigger["status"],
                    payment_intent=trigger.get("payment_intent"), reason=trigger.get("reason"))
            if charge.succeeded and charge.intent is not None and charge.payment_intent:
                units = await self._credit_in(session, trigger, charge.intent, now)
                await self.store.succeeded_in(session, trigger,
                                              payment_intent=charge.payment_intent, now=now)
                return AutoTopUpResult(trigger_id=order.trigger_id, outcome=SUCCEEDED,
                                       payment_intent=charge.payment_intent,
                                       credited_units=units)
            reason = charge.reason or "failed"
            paused = await self.store.failed_in(session, trigger,
                                                payment_intent=charge.payment_intent,
                                                reason=reason, now=now)
            return AutoTopUpResult(trigger_id=order.trigger_id, outcome="failed",
                                   payment_intent=charge.payment_intent, paused=paused,
                                   reason=reason)

        with final_on_bad_input():
            result = await run_in_transaction(self.runtime.db.client, work)
        activity.logger.info("auto top-up %s: %s", result.outcome,
                             result.reason or result.payment_intent,
                             extra={"org_id": order.org_id, "workflow_id": order.trigger_id})
        return result

    async def _credit_in(self, session: AsyncClientSession, trigger: Doc, intent: Obj,
                         now: datetime) -> int:
        """The purchase rule on the PaymentIntent (its metadata names the pack), written as the
        webhook of that payment would write it; 0 when it is already credited."""
        ledger = self.runtime.ledger
        pi = ref_id(intent.get("id"))
        if pi is None or await ledger.paid_for_in(session, pi):
            return 0
        purchase = resolve_purchase(self.runtime.config, line_items=None, metadata=(intent,),
                                    paid_cents=amount(intent.get("amount_received")))
        if purchase.verdict is not Verdict.CREDIT:
            raise ValueError(f"the top-up {pi} resolves to no pack: {purchase.reason}")
        created = intent.get("created")
        bought_at = datetime.fromtimestamp(created, UTC) if isinstance(created, int) else now
        credited = 0
        for index, line in enumerate(purchase.lines):
            result = await ledger.write_in(
                session, trigger["org_id"], key=line_key(purchase_key(pi, None), index),
                kind=EntryKind.TOPUP, amount=line.units, now=now,
                memo=f"automatic top-up: pack {line.pack.id}",
                terms=LotTerms(expires_at=line.expires_at(bought_at), payment_intent=pi,
                               charge=ref_id(intent.get("latest_charge")), pack_id=line.pack.id,
                               price_cents=line.price_cents, line=index + 1),
                meta={"auto_topup": trigger["_id"]}, unused_key=True,  # see paid_for_in
            )
            credited += result.amount
        return credited


def _failed(order: AutoTopUpOrder, reason: str, payment_intent: str | None = None
            ) -> AutoTopUpCharge:
    return AutoTopUpCharge(order=order, succeeded=False, payment_intent=payment_intent,
                           reason=reason)
