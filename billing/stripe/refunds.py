"""Refunds (SPEC §5.1): which refunds an event carries and what each one asks of the ledger."""

from __future__ import annotations

from enum import StrEnum

from billing.stripe.objects import Obj, amount, ref_id, whole_list

#: A refund in these states took (or is taking) the money back: claw back when created.
CLAWED_STATUSES = frozenset({"pending", "succeeded", "requires_action"})
#: A refund that ends in these states gave nothing back: restore what it clawed.
REVERSED_STATUSES = frozenset({"failed", "canceled"})


class RefundAction(StrEnum):
    CLAW = "claw"
    REVERSE = "reverse"
    NONE = "none"


def refund_action(refund: Obj) -> RefundAction:
    """A pending refund is clawed back when created; a failed or canceled one is reversed."""
    status = refund.get("status")
    if status in REVERSED_STATUSES:
        return RefundAction.REVERSE
    if status in CLAWED_STATUSES and amount(refund.get("amount")) > 0 and ref_id(refund.get("id")):
        return RefundAction.CLAW
    return RefundAction.NONE


#: `metadata.billing_scope` of a refund: the merchant refunded the pack lines (`packs`) or the
#: other lines (`other`) of a mixed cart; without it a refund is spread over the whole charge.
SCOPES = frozenset({"packs", "other"})


def refund_scope(refund: Obj) -> str | None:
    """The refund's `billing_scope` (`packs`, `other`), or None (pro rata over everything the
    charge paid for). An unknown value counts as none."""
    meta = refund.get("metadata")
    scope = meta.get("billing_scope") if isinstance(meta, dict) else None
    return scope if scope in SCOPES else None


def charge_refunds(charge: Obj) -> list[Obj] | None:
    """The refunds a `charge.refunded` payload carries, or None when they must be listed
    through the API (not expanded, or only a first page)."""
    return whole_list(charge.get("refunds"))


def refund_key(refund_id: str) -> str:
    return f"refund:{refund_id}"


def reversal_key(refund_id: str) -> str:
    return f"refund:{refund_id}:reversed"
