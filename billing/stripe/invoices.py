"""Invoices (SPEC §5.4, §5.5): whether an invoice event changes a subscription's status, and the
pack lines a paid invoice credits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from billing.stripe.objects import Obj, amount, ref_id, whole_list
from billing.stripe.purchases import PurchaseLine
from billing.stripe.subscriptions import DELINQUENT_STATUSES, LIVE_STATUSES

if TYPE_CHECKING:
    from billing.config import BillingConfig


def invoice_subscription(invoice: Obj) -> str | None:
    """`parent.subscription_details.subscription` (newer API), else `subscription`."""
    parent = invoice.get("parent")
    if isinstance(parent, dict):
        details = parent.get("subscription_details")
        if isinstance(details, dict):
            found = ref_id(details.get("subscription"))
            if found:
                return found
    return ref_id(invoice.get("subscription"))


def invoice_subscription_metadata(invoice: Obj) -> Obj | None:
    """The subscription's metadata snapshot Stripe copies onto the invoice (newer API)."""
    parent = invoice.get("parent")
    if isinstance(parent, dict):
        details = parent.get("subscription_details")
        if isinstance(details, dict) and isinstance(details.get("metadata"), dict):
            return {"metadata": details["metadata"]}
    return None


@dataclass(frozen=True)
class InvoiceEffect:
    """`status` None: the invoice changes no status (a notification at most)."""

    status: str | None
    reason: str | None = None
    reread_plan: bool = False


def invoice_effect(failed: bool, subscription_status: str | None) -> InvoiceEffect:
    """Invoices count only for a live subscription: a failed one makes it `past_due`; a paid one
    brings a delinquent subscription back to `active` (and its plan is read again from Stripe).
    A failed invoice of an ended subscription, or of none, changes nothing but notifies."""
    if subscription_status is None:
        return InvoiceEffect(None, "the invoice belongs to no subscription of the organization")
    if failed:
        if subscription_status in LIVE_STATUSES:
            return InvoiceEffect("past_due")
        return InvoiceEffect(None, f"the subscription is {subscription_status}, not live")
    if subscription_status in DELINQUENT_STATUSES:
        return InvoiceEffect("active", reread_plan=True)
    return InvoiceEffect(None, f"the subscription is {subscription_status}: nothing to recover")


def invoice_lines(invoice: Obj) -> list[Obj] | None:
    """The line items an invoice payload carries, or None when they must be listed through the
    API (Stripe sends the first page only: `has_more`)."""
    return whole_list(invoice.get("lines"))


def line_price(line: Obj) -> str | None:
    """`pricing.price_details.price` (API versions from 2025-03-31), else `price` (older)."""
    pricing = line.get("pricing")
    if isinstance(pricing, dict) and isinstance(pricing.get("price_details"), dict):
        found = ref_id(pricing["price_details"].get("price"))
        if found:
            return found
    return ref_id(line.get("price"))


@dataclass(frozen=True)
class InvoicePack:
    """A pack line of a paid invoice: its ledger key `invoice:<in id>:<line id>` and what it
    credits."""

    key: str
    line: PurchaseLine


def invoice_packs(config: BillingConfig, invoice_id: str, lines: list[Obj]) -> list[InvoicePack]:
    """Every line whose price is one of a pack's `stripe_price_ids`, whatever made the invoice
    (the first invoice of a subscription Checkout with a one-time pack price, `add_invoice_items`,
    a one-off invoice from the Dashboard): `pack.units x quantity` at what the line cost. A plan's
    recurring line, a T-shirt or a line without a positive quantity credits nothing.

    `il_1` with price `price_pack_500k`, quantity 2, amount 9800 -> key `invoice:in_1:il_1`,
    1000000 units at 9800 cents."""
    found: list[InvoicePack] = []
    for line in lines:
        price = line_price(line)
        pack = config.pack_for_price(price) if price else None
        line_id = ref_id(line.get("id"))
        quantity = line.get("quantity")
        if pack is None or line_id is None or isinstance(quantity, bool) or not isinstance(
                quantity, int) or quantity < 1:
            continue
        cost = amount(line.get("amount"))
        found.append(InvoicePack(f"invoice:{invoice_id}:{line_id}", PurchaseLine(
            pack, quantity, cost if cost > 0 else pack.price_cents * quantity)))
    return found


def invoice_payment(invoice: Obj, payments: list[Obj] | None = None) -> tuple[str | None,
                                                                                str | None]:
    """The payment intent and charge that paid the invoice, for its lots (refunds and disputes
    find the lots by them): `payments` (`invoice_payment` objects, API versions from 2025-03-31;
    the paid one, else the default one), else the invoice's own `payment_intent` and `charge`
    (older versions)."""
    ordered = sorted(payments or [], key=lambda p: (p.get("status") != "paid",
                                                    not p.get("is_default")))
    for found in ordered:
        payment = found.get("payment")
        if isinstance(payment, dict):
            intent, charge = ref_id(payment.get("payment_intent")), ref_id(payment.get("charge"))
            if intent or charge:
                return intent, charge
    return ref_id(invoice.get("payment_intent")), ref_id(invoice.get("charge"))
