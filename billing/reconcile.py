"""The rules of the reconciliation (SPEC §6, issue 5), pure: no database, no clock, no I/O.

Each check compares two records the engine keeps of the same fact and describes what disagrees
as a `Divergence`. The reconciliation only reports: it never changes a balance itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing.config import BillingConfig, ReconcileConfig
from billing.ledger import EntryKind
from billing.models import Divergence, LedgerSums
from billing.stripe.subscriptions import ENDED_STATUSES, plan_for_subscription


def is_divergent(expected: int, actual: int, tolerance: ReconcileConfig) -> bool:
    """`|delta| > max(tolerance_units, tolerance_ratio * max(expected, actual))`, in Decimal.

    With the example tolerance (50 units, 0.5 %), an expected 100000 tolerates a gap of 500.
    """
    allowed = max(Decimal(tolerance.tolerance_units),
                  tolerance.tolerance_ratio * Decimal(max(expected, actual)))
    return Decimal(abs(expected - actual)) > allowed


@dataclass(frozen=True)
class LotState:
    id: str
    units: int
    remaining: int
    repaid_debt: int
    #: Units the organization's entries record as drawn from this lot (their `draws`).
    drawn: int


@dataclass(frozen=True)
class LedgerState:
    """One organization's ledger as read in one snapshot."""

    org_id: str
    balance: int
    usage_debt: int
    other_debt: int
    entries_total: int
    lots: tuple[LotState, ...]


def add_entries(
    sums: LedgerSums, entries: Iterable[Mapping[str, Any]], *, through_seq: int,
    week_start: datetime, week_end: datetime,
) -> LedgerSums:
    """`sums` plus `entries`, which must be every entry of the organization with
    `sums.through_seq < seq <= through_seq`: each entry is then counted exactly once.

    Adds the amount to the entries' total, each draw to its lot, and a `usage:*` debit created
    in `[week_start, week_end)` to the week's usage debits (as positive units)."""
    total, debits = sums.entries_total, sums.week_usage_debits
    drawn = dict(sums.drawn)
    for entry in entries:
        amount = int(entry["amount"])
        total += amount
        for draw in entry.get("draws") or ():
            drawn[draw["lot_id"]] = drawn.get(draw["lot_id"], 0) + int(draw["units"])
        if (entry["kind"] == EntryKind.DEBIT.value and str(entry["key"]).startswith("usage:")
                and week_start <= entry["created_at"] < week_end):
            debits -= amount
    return LedgerSums(org_id=sums.org_id, through_seq=through_seq, entries_total=total,
                      drawn=drawn, week_usage_debits=debits)


def ledger_divergences(state: LedgerState) -> list[Divergence]:
    """`balance == sum(entries)`, every lot's `remaining == units - repaid_debt - drawn`, and
    `balance == sum(remaining) - usage_debt - other_debt` (SPEC §5.1)."""
    found: list[Divergence] = []

    def add(kind: str, subject: str, expected: int, actual: int, detail: str) -> None:
        found.append(Divergence(org_id=state.org_id, check="ledger", kind=kind, subject=subject,
                                expected=expected, actual=actual, detail=detail))

    if state.balance != state.entries_total:
        add("balance_vs_entries", "balance", state.entries_total, state.balance,
            "the balance differs from the sum of the entries")
    for lot in state.lots:
        expected = lot.units - lot.repaid_debt - lot.drawn
        if lot.remaining != expected:
            add("lot_remaining", lot.id, expected, lot.remaining,
                "remaining differs from units - repaid debt - drawn")
    lots_view = sum(lot.remaining for lot in state.lots) - state.usage_debt - state.other_debt
    if state.balance != lots_view:
        add("balance_vs_lots", "balance", lots_view, state.balance,
            "the balance differs from the lots' remaining minus the debt")
    return found


def meter_divergence(
    org_id: str, week: str, overflow: int | None, debited: int, tolerance: ReconcileConfig
) -> Divergence | None:
    """The week's metered overflow (expected) against its usage debits (actual); nothing to
    compare (None) for a meter that does not count its overflow (opened before meters did)."""
    if overflow is None or not is_divergent(overflow, debited, tolerance):
        return None
    return Divergence(org_id=org_id, check="meter", kind="overflow_vs_debits", subject=week,
                      expected=overflow, actual=debited,
                      detail=f"usage debits differ from the metered overflow by "
                             f"{debited - overflow:+d} units")


def subscription_divergences(
    config: BillingConfig, org_id: str, *, status: str, plan_id: str | None,
    stripe_subscription: dict[str, Any],
) -> list[Divergence]:
    """The engine's status and plan against the subscription as Stripe has it now, read the way
    a subscription event would apply it (`plan_for_subscription`)."""
    subject = str(stripe_subscription.get("id") or "")
    choice = plan_for_subscription(config, stripe_subscription)
    found: list[Divergence] = []
    if choice.status != status:
        found.append(Divergence(org_id=org_id, check="subscription", kind="status",
                                subject=subject, expected=choice.status, actual=status,
                                detail="Stripe's status differs from the engine's"))
    if choice.status in ENDED_STATUSES or status in ENDED_STATUSES:
        return found  # an ended subscription pays for no plan
    if choice.plan_id is None:
        found.append(Divergence(org_id=org_id, check="subscription", kind="plan_unresolved",
                                subject=subject, expected=", ".join(choice.unknown_prices),
                                actual=plan_id,
                                detail="no configured plan has the subscription's prices"))
    elif choice.plan_id != plan_id:
        found.append(Divergence(org_id=org_id, check="subscription", kind="plan",
                                subject=subject, expected=choice.plan_id, actual=plan_id,
                                detail="Stripe's prices map to another plan than the engine's"))
    return found


def missing_subscription(org_id: str, subscription_id: str, reason: str) -> Divergence:
    return Divergence(org_id=org_id, check="subscription", kind="missing_in_stripe",
                      subject=subscription_id, expected=None, actual=subscription_id,
                      detail=reason)
