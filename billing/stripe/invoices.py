"""Invoices (SPEC §5.4): whether an invoice event changes a subscription's status."""

from __future__ import annotations

from dataclasses import dataclass

from billing.stripe.objects import Obj, ref_id
from billing.stripe.subscriptions import DELINQUENT_STATUSES, LIVE_STATUSES


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
