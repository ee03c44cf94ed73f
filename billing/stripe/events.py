"""Event types, their families and ordering markers (SPEC §5.4, §5.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.stripe.objects import Obj

CHECKOUT_COMPLETED = "checkout.session.completed"
CHECKOUT_ASYNC_SUCCEEDED = "checkout.session.async_payment_succeeded"
CHECKOUT_ASYNC_FAILED = "checkout.session.async_payment_failed"
PAYMENT_INTENT_SUCCEEDED = "payment_intent.succeeded"
SUBSCRIPTION_TYPES = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    }
)
CUSTOMER_DELETED = "customer.deleted"
INVOICE_FAILED = "invoice.payment_failed"
INVOICE_PAID_TYPES = frozenset({"invoice.payment_succeeded", "invoice.paid"})
INVOICE_TYPES = INVOICE_PAID_TYPES | {INVOICE_FAILED}
CHARGE_REFUNDED = "charge.refunded"
REFUND_OBJECT_TYPES = frozenset(
    {"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"}
)
REFUND_TYPES = REFUND_OBJECT_TYPES | {CHARGE_REFUNDED}
DISPUTE_TYPES = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
        "charge.dispute.closed",
    }
)
CHECKOUT_TYPES = frozenset({CHECKOUT_COMPLETED, CHECKOUT_ASYNC_SUCCEEDED, CHECKOUT_ASYNC_FAILED})
HANDLED_TYPES = (
    CHECKOUT_TYPES
    | {PAYMENT_INTENT_SUCCEEDED, CUSTOMER_DELETED}
    | SUBSCRIPTION_TYPES
    | INVOICE_TYPES
    | REFUND_TYPES
    | DISPUTE_TYPES
)

SUBSCRIPTION_FAMILY = "subscription"
INVOICE_FAMILY = "invoice"


def is_handled(event_type: str) -> bool:
    return event_type in HANDLED_TYPES


def family(event_type: str, obj: Obj) -> str | None:
    """The ordering family of an event: subscription, invoice, or None (not ordered)."""
    if event_type in SUBSCRIPTION_TYPES or event_type == CUSTOMER_DELETED:
        return SUBSCRIPTION_FAMILY
    if event_type == CHECKOUT_COMPLETED and obj.get("mode") == "subscription":
        return SUBSCRIPTION_FAMILY
    if event_type in INVOICE_TYPES:
        return INVOICE_FAMILY
    return None


@dataclass(frozen=True, order=True)
class Marker:
    """Where a family of one subscription stands: the `(created, event id)` of the newest event
    applied."""

    created: int
    event_id: str

    def to_doc(self) -> dict[str, Any]:
        return {"created": self.created, "event_id": self.event_id}

    @classmethod
    def from_doc(cls, doc: object) -> Marker | None:
        if not isinstance(doc, dict):
            return None
        return cls(created=int(doc["created"]), event_id=str(doc["event_id"]))


def is_stale(current: Marker | None, event: Marker) -> bool:
    """An event not newer than its family's marker changes nothing; the same second is ordered
    by event id (any total order keeps replicas consistent)."""
    return current is not None and event <= current
