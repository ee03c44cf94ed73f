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
    by event id (any total order keeps replicas consistent). Subscription-family events of the
    same second are not ordered at all (`same_second`)."""
    return current is not None and event <= current


def same_second(current: Marker | None, event: Marker) -> bool:
    """Another event of the marker's second (SPEC 5.4): Stripe's `created` has one-second
    resolution and its event ids are not ordered, so which of the two is newer cannot be told.
    Checkout emits `customer.subscription.created` (`incomplete`) and `.updated` (`active`) in
    one second: `Marker(1700000000, "evt_b")` then `Marker(1700000000, "evt_a")` is a tie; the
    engine reads the subscription from Stripe and applies what Stripe holds."""
    return (current is not None and event.created == current.created
            and event.event_id != current.event_id)


def key_is_live(api_key: str) -> bool | None:
    """The mode of a Stripe API key: `sk_live_`/`rk_live_` keys are live, any other key is a
    test key; None without a key (the mode cannot be told).

    >>> key_is_live("sk_live_abc"), key_is_live("rk_live_abc"), key_is_live("sk_test_abc")
    (True, True, False)
    >>> key_is_live("") is None
    True
    """
    if not api_key:
        return None
    return api_key.startswith(("sk_live_", "rk_live_"))


def other_mode(livemode: object, api_key: str) -> bool:
    """Whether an event belongs to the other Stripe mode than the engine's API key (SPEC §5.5):
    answered `ignored` without a workflow, so a test purchase never credits real units. An event
    without a boolean `livemode`, or an engine without an API key, keeps the usual path.

    >>> other_mode(False, "sk_live_abc"), other_mode(True, "sk_test_abc")
    (True, True)
    >>> other_mode(True, "rk_live_abc"), other_mode(False, "sk_test_abc")
    (False, False)
    >>> other_mode(None, "sk_live_abc"), other_mode(True, "")
    (False, False)
    """
    live = key_is_live(api_key)
    return isinstance(livemode, bool) and live is not None and livemode != live
