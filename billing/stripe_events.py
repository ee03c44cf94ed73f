"""The rules for reading Stripe events (SPEC §5.4, §5.5), pure: no database, no clock, no I/O.

Stripe objects arrive as plain JSON dicts (the webhook payload or an API read); these helpers
pick out what the engine needs and tolerate the shapes of older and newer API versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from billing.config import BillingConfig, PackConfig

Obj = dict[str, Any]

PURCHASE_TYPES = frozenset({"checkout.session.completed", "payment_intent.succeeded"})
SUBSCRIPTION_TYPES = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.deleted",
    }
)
INVOICE_FAILED = "invoice.payment_failed"
INVOICE_PAID_TYPES = frozenset({"invoice.payment_succeeded", "invoice.paid"})
INVOICE_TYPES = INVOICE_PAID_TYPES | {INVOICE_FAILED}
REFUND_TYPES = frozenset({"charge.refunded", "refund.created"})
DISPUTE_TYPES = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
        "charge.dispute.closed",
    }
)
HANDLED_TYPES = PURCHASE_TYPES | SUBSCRIPTION_TYPES | INVOICE_TYPES | REFUND_TYPES | DISPUTE_TYPES

SUBSCRIPTION_FAMILY = "subscription"
INVOICE_FAMILY = "invoice"

#: Subscription statuses that put the organization on the default plan (SPEC §5.4).
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
#: Statuses an `invoice.payment_succeeded` / `invoice.paid` recovers from.
DELINQUENT_STATUSES = frozenset({"past_due", "unpaid"})

ORG_KEYS = ("org_id", "organizationId")
PACK_KEYS = ("pack_id", "packId")
_ORG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_handled(event_type: str) -> bool:
    return event_type in HANDLED_TYPES


def family(event_type: str, obj: Obj) -> str | None:
    """The ordering family of an event: subscription, invoice, or None (not ordered)."""
    if event_type in SUBSCRIPTION_TYPES:
        return SUBSCRIPTION_FAMILY
    if event_type == "checkout.session.completed" and obj.get("mode") == "subscription":
        return SUBSCRIPTION_FAMILY
    if event_type in INVOICE_TYPES:
        return INVOICE_FAMILY
    return None


# ---- ordering markers ----------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Marker:
    """Where a family stands: the `(created, event id)` of the newest event applied."""

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
    by event id (Stripe ids of one account sort by creation within a second often enough, and
    any total order keeps replicas consistent)."""
    return current is not None and event <= current


# ---- metadata --------------------------------------------------------------------------------


def _metadata(obj: Obj | None) -> Obj:
    meta = (obj or {}).get("metadata")
    return meta if isinstance(meta, dict) else {}


def _first(meta: Obj, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def org_from(*objs: Obj | None) -> str | None:
    """`metadata.org_id` (or the seed's `organizationId`) of the first object naming a valid one."""
    for obj in objs:
        org = _first(_metadata(obj), ORG_KEYS)
        if org is not None and _ORG_ID.fullmatch(org):
            return org
    return None


def pack_from(*objs: Obj | None) -> str | None:
    """`metadata.pack_id` (or the seed's `packId`) of the first object naming one."""
    for obj in objs:
        pack = _first(_metadata(obj), PACK_KEYS)
        if pack is not None:
            return pack
    return None


def ref_id(value: object) -> str | None:
    """The id of a reference that is either a string id or an expanded object."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


@dataclass(frozen=True)
class PackChoice:
    """The pack a checkout bought; without one, `ambiguous` says a pack was bought but which
    one cannot be told (unresolved) rather than no pack at all (ignored)."""

    pack: PackConfig | None
    quantity: int = 1
    reason: str | None = None
    ambiguous: bool = False


def pack_from_line_items(config: BillingConfig, items: list[Obj]) -> PackChoice:
    """The pack bought, from the price ids of a checkout's line items (the last fallback).

    Ambiguity guard: exactly one line item may carry a pack price; two different packs in one
    checkout cannot be told apart by a refund later, so nothing is credited.
    """
    found: list[tuple[PackConfig, int]] = []
    for item in items:
        price = ref_id(item.get("price"))
        pack = config.pack_for_price(price) if price else None
        if pack is not None:
            found.append((pack, int(item.get("quantity") or 1)))
    if not found:
        return PackChoice(None, reason="no line item has a pack price")
    if len(found) > 1:
        return PackChoice(None, reason="several pack line items", ambiguous=True)
    pack, quantity = found[0]
    if quantity < 1:
        return PackChoice(None, reason="line item quantity is not positive", ambiguous=True)
    return PackChoice(pack, quantity)


# ---- subscriptions and invoices -------------------------------------------------------------


def timestamp(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return datetime.fromtimestamp(int(value), UTC)


def subscription_items(sub: Obj) -> list[Obj]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def price_ids(sub: Obj) -> list[str]:
    return [p for p in (ref_id(item.get("price")) for item in subscription_items(sub)) if p]


def period_start(sub: Obj) -> datetime | None:
    """`items.data[0].current_period_start`, else the top-level field of older API versions."""
    items = subscription_items(sub)
    if items:
        found = timestamp(items[0].get("current_period_start"))
        if found is not None:
            return found
    return timestamp(sub.get("current_period_start"))


@dataclass(frozen=True)
class PlanChoice:
    """The plan a subscription puts the organization on; `plan_id` None keeps the last known
    plan (an unknown price), and `unknown_prices` says which prices were not recognised."""

    plan_id: str | None
    status: str
    unknown_prices: tuple[str, ...] = ()


def plan_for_subscription(config: BillingConfig, sub: Obj, *, deleted: bool = False) -> PlanChoice:
    """Plan and status from a subscription: an ended subscription goes to the default plan with
    status `canceled`; otherwise the plan whose `stripe_price_ids` holds one of its prices."""
    status = str(sub.get("status") or "incomplete")
    if deleted or status in ENDED_STATUSES:
        return PlanChoice(config.default_plan.id, "canceled")
    prices = price_ids(sub)
    for price in prices:
        plan = config.plan_for_price(price)
        if plan is not None:
            return PlanChoice(plan.id, status)
    return PlanChoice(None, status, tuple(prices))


def ends_another_subscription(current: str | None, sub: Obj, *, deleted: bool) -> bool:
    """The event ends a subscription other than the organization's current one."""
    sub_id = ref_id(sub.get("id"))
    ended = deleted or sub.get("status") in ENDED_STATUSES
    return bool(current and sub_id and sub_id != current and ended)


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


# ---- refunds and disputes -------------------------------------------------------------------


def charge_refunds(charge: Obj) -> list[Obj] | None:
    """The refunds a `charge.refunded` payload carries, or None when they must be listed
    through the API (not expanded, or only a first page)."""
    refunds = charge.get("refunds")
    if not isinstance(refunds, dict) or not isinstance(refunds.get("data"), list):
        return None
    if refunds.get("has_more"):
        return None
    return [r for r in refunds["data"] if isinstance(r, dict)]


def counts_as_refunded(refund: Obj) -> bool:
    """Refunds that took money back (pending ones usually succeed; failed and canceled do not)."""
    return refund.get("status") not in ("failed", "canceled") and int(refund.get("amount") or 0) > 0
