"""The dispute lifecycle (SPEC §5.1) as one decision per event."""

from __future__ import annotations

from enum import StrEnum

from billing.stripe.objects import Obj


class DisputeAction(StrEnum):
    OPEN = "open"  # notify only
    WITHDRAW = "withdraw"  # claw back the disputed amount once
    REINSTATE = "reinstate"  # give back exactly what the withdrawal took
    NONE = "none"


def dispute_action(event_type: str, dispute: Obj) -> DisputeAction:
    """`created` notifies; `funds_withdrawn` or a `closed` lost claws back; `funds_reinstated`
    or a `closed` won restores. The withdrawal and the reinstatement have one key each, so the
    closing event repeats nothing a funds event already did."""
    kind = event_type.removeprefix("charge.dispute.")
    status = dispute.get("status")
    if kind == "created":
        return DisputeAction.OPEN
    if kind == "funds_withdrawn" or (kind == "closed" and status == "lost"):
        return DisputeAction.WITHDRAW
    if kind == "funds_reinstated" or (kind == "closed" and status == "won"):
        return DisputeAction.REINSTATE
    return DisputeAction.NONE


def withdrawn_key(dispute_id: str) -> str:
    return f"dispute:{dispute_id}:withdrawn"


def reinstated_key(dispute_id: str) -> str:
    return f"dispute:{dispute_id}:reinstated"
