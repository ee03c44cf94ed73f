"""Automatic top-up (SPEC §5.8) as pure decisions on plain data: no database, no clock.

An organization's auto top-up state lives on its account (`auto_topup`), so the ledger write that
lowers the balance already holds it, locked, in the same transaction. The store
(`billing.store.auto_topups`) applies these decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from billing.errors import BillingError

#: Failures in a row (declines, `requires_action`) after which auto top-up pauses.
FAILURES_BEFORE_PAUSE = 3


@dataclass(frozen=True)
class AutoTopUp:
    """The settings and counters kept on the account.

    `this_month` counts the top-ups of calendar month `month` (UTC) that succeeded or are in
    flight: a failed one gives its place back. `triggers` counts every trigger ever recorded
    (the `n` of `auto-topup-<org>-<n>`); `in_flight` is the workflow id of the open one.
    """

    enabled: bool = False
    pack_id: str | None = None
    below_units: int = 0
    max_per_month: int = 0
    paused: bool = False
    failures: int = 0
    in_flight: str | None = None
    month: str | None = None
    this_month: int = 0
    triggers: int = 0

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None) -> AutoTopUp:
        doc = doc or {}
        return cls(**{name: doc[name] for name in cls.__dataclass_fields__ if name in doc})

    def count_in(self, month: str) -> int:
        """Top-ups of `month` so far (0 once the stored month is over)."""
        return self.this_month if self.month == month else 0


def month_of(moment: datetime) -> str:
    """The calendar month (UTC) a top-up counts in, `YYYY-MM`."""
    return f"{moment.year:04d}-{moment.month:02d}"


def workflow_id(org_id: str, n: int) -> str:
    """`auto-topup-<org>-<n>`: n counts the organization's triggers, so an id is never reused."""
    return f"auto-topup-{org_id}-{n}"


def should_trigger(state: AutoTopUp, *, balance_before: int, balance_after: int,
                   month: str) -> bool:
    """Whether the write that took the balance from `balance_before` to `balance_after` starts
    a top-up.

    Invariant: a top-up starts only on a write that lowers the balance and leaves it below
    `below_units`, while auto top-up is enabled and not paused, no other top-up of the
    organization is in flight, and fewer than `max_per_month` top-ups of this month succeeded or
    are in flight. A write that lowers a balance already below the threshold triggers too (after
    a failed top-up, or one whose pack did not lift the balance above the threshold), so the
    threshold is crossed "again" by the next debit rather than never.
    """
    return (
        state.enabled
        and not state.paused
        and state.pack_id is not None
        and state.in_flight is None
        and balance_after < balance_before
        and balance_after < state.below_units
        and state.count_in(month) < state.max_per_month
    )


def triggered(state: AutoTopUp, org_id: str, month: str) -> AutoTopUp:
    """The state once a trigger is recorded: the next `n` in flight, counted in `month`."""
    n = state.triggers + 1
    return replace(state, triggers=n, in_flight=workflow_id(org_id, n), month=month,
                   this_month=state.count_in(month) + 1)


def succeeded(state: AutoTopUp) -> AutoTopUp:
    """A success closes the top-up and resets the failure streak."""
    return replace(state, in_flight=None, failures=0)


def failed(state: AutoTopUp, trigger_month: str) -> AutoTopUp:
    """A failure closes the top-up, gives its place in the month back, and after
    `FAILURES_BEFORE_PAUSE` in a row pauses auto top-up (`paused` turns true only here)."""
    failures = state.failures + 1
    this_month = state.this_month
    if state.month == trigger_month and this_month > 0:
        this_month -= 1
    return replace(state, in_flight=None, failures=failures, this_month=this_month,
                   paused=state.paused or failures >= FAILURES_BEFORE_PAUSE)


def configured(state: AutoTopUp, *, enabled: bool, pack_id: str, below_units: int,
               max_per_month: int) -> AutoTopUp:
    """New settings keep the counters; enabling clears a pause and its failure streak (the
    operator or the customer fixed the card)."""
    if enabled:
        state = replace(state, paused=False, failures=0)
    return replace(state, enabled=enabled, pack_id=pack_id, below_units=below_units,
                   max_per_month=max_per_month)


class NoPaymentMethod(BillingError):
    """Auto top-up charges the organization's Stripe customer: without a linked one there is
    nothing to charge."""

    status = 409
    code = "NO_PAYMENT_METHOD"
