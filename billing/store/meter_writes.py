"""How a usage record changes a week's meter and the ledger, planned on the write engine
(SPEC §5.2): the one copy of the usage rule, for a lone record and for a group commit alike.

A record increments its week's meter (opening it with the plan snapshot when it is the week's
first), debits the overflow from extras (ledger key `usage:<run_id>:<step>`), raises the alerts
it crosses, and is stored with the response it answered (`usage_doc`). A balance hold is kept on
its week's meter too (`reserve`, SPEC §5.11).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing.config import BillingConfig, PlanConfig
from billing.holds import Reservation
from billing.ledger import EntryKind
from billing.metering import (
    Metered,
    UsageRequest,
    effective_plan,
    grant_alert,
    is_runaway,
    overflow,
    plan_quota,
    thresholds_crossed,
)
from billing.store.books import Books
from billing.store.database import Doc
from billing.store.documents import Account, MeterWeek


@dataclass(frozen=True)
class UsageResult:
    """The answer of `POST /v1/usage`."""

    applied: bool
    units: int
    overflow: int
    week: str
    used: int
    quota: int
    balance: int


def usage_id(request: UsageRequest) -> str:
    """A usage record's `_id`: its idempotency key. Unambiguous, as no part may contain `/`."""
    return f"{request.org_id}/{request.run_id}/{request.step}"


def stored_result(record: Doc) -> UsageResult:
    """The answer a replay gets: the stored first one, `applied: false`."""
    return UsageResult(
        applied=False, units=record["units"], overflow=record["overflow"], week=record["week"],
        used=record["used"], quota=record["quota"], balance=record["balance"],
    )


class MeterWrites:
    """The meter rules of SPEC §5.2-§5.3 applied on a `Books`."""

    def __init__(self, config: BillingConfig) -> None:
        self.config = config

    def opening_plan(self, account: Account) -> PlanConfig:
        """The plan a week opens on: the account's, unless its subscription's status (the
        standing the account keeps a copy of) overrides it."""
        return effective_plan(self.config, account.plan_id, account.status)

    def opened(self, account: Account, plan: PlanConfig, week: str) -> MeterWeek:
        """A new week's meter, with the snapshot of `plan`."""
        return MeterWeek(org_id=account.org_id, week=week, used=0,
                         quota=plan_quota(plan, account.seats), plan_id=plan.id,
                         ratio_version=self.config.meter.ratio_version)

    def plan_of(self, books: Books, org_id: str, week: str) -> tuple[MeterWeek | None,
                                                                       PlanConfig]:
        """The week's meter (None: not open yet) and the plan a record is priced on: the
        meter's, or the one the week would open with."""
        meter = books.meter(org_id, week)
        if meter is not None:
            return meter, self.config.plan(meter.plan_id)
        return None, self.opening_plan(books.account(org_id))

    def week_of(self, books: Books, org_id: str, week: str) -> MeterWeek:
        """The week's meter, opened with the plan it opens on when it is not stored yet (its
        account and the week loaded)."""
        meter, plan = self.plan_of(books, org_id, week)
        return meter or books.open_meter(self.opened(books.account(org_id), plan, week))

    def reserve(self, books: Books, org_id: str, reservation: Reservation, week: str) -> None:
        """Keep a granted hold on the week's meter."""
        books.reserve(self.week_of(books, org_id, week), reservation)

    def record(self, books: Books, request: UsageRequest, metered: Metered,
                     plan: PlanConfig, now: datetime, week: str) -> tuple[UsageResult, Doc]:
        """Count `metered` (priced on `plan`, `plan_of`) on the week's meter: the overflow debited,
        the alerts raised; the answer and the usage record to store."""
        account = books.account(request.org_id)
        meter = self.week_of(books, request.org_id, week)
        prev_used = meter.used
        books.add_usage(meter, metered.units)
        over = overflow(prev_used, meter.used, meter.quota)
        balance = account.balance
        if over > 0:
            balance = self._debit(books, request, meter, plan, over, now)
        self.threshold_alerts(books, meter, prev_used, now)
        result = UsageResult(applied=True, units=metered.units, overflow=over, week=week,
                             used=meter.used, quota=meter.quota, balance=balance)
        return result, self._usage_doc(request, metered, result, meter, now)

    def _debit(self, books: Books, request: UsageRequest, meter: MeterWeek,
                     plan: PlanConfig, units: int, now: datetime) -> int:
        """Debit the overflow from extras, count it on the meter and raise the balance alerts
        it triggers: the signup grant's threshold crossed (plans without quota) and a runaway
        week (once)."""
        org_id, week = request.org_id, meter.week
        before = books.account(org_id).balance
        posted = books.post(
            org_id, kind=EntryKind.DEBIT, amount=-units, now=now,
            key=f"usage:{request.run_id}:{request.step}", memo=f"usage overflow {week}",
            meta={"week": week, "run_id": request.run_id, "step": request.step})
        balance = posted.balance
        books.add_usage(meter, 0, overflow=units)
        pct = grant_alert(before, balance, plan.signup_grant) if meter.quota == 0 else None
        if pct is not None:
            books.notify(org_id, type="extras.balance_threshold_crossed",
                         key=f"extras.balance_threshold_crossed:{week}:{pct}",
                         payload={"week": week, "threshold": pct, "balance": balance,
                                  "grant": plan.signup_grant}, now=now)
        factor = self.config.meter.runaway_factor
        if is_runaway(balance, meter.quota, factor) and not meter.runaway_alerted:
            books.notify(org_id, type="extras.runaway_debit", key=f"extras.runaway_debit:{week}",
                         payload={"week": week, "balance": balance, "quota": meter.quota,
                                  "factor": factor}, now=now)
            books.set_meter(meter, runaway_alerted=True)
        return balance

    def threshold_alerts(self, books: Books, meter: MeterWeek, prev_used: int,
                         now: datetime) -> None:
        """`meter.threshold_crossed` for each threshold crossed from `prev_used` to now."""
        for pct in thresholds_crossed(prev_used, meter.used, meter.quota,
                                      self.config.meter.alert_thresholds):
            books.notify(meter.org_id, type="meter.threshold_crossed",
                         key=f"meter.threshold_crossed:{meter.week}:{pct}",
                         payload={"week": meter.week, "threshold": pct, "used": meter.used,
                                  "quota": meter.quota, "plan_id": meter.plan_id}, now=now)

    def _usage_doc(self, request: UsageRequest, metered: Metered, result: UsageResult,
                   meter: MeterWeek, now: datetime) -> Doc:
        costs = None if request.costs is None else {k: str(v) for k, v in request.costs.items()}
        return {
            "_id": usage_id(request),
            "org_id": request.org_id,
            "run_id": request.run_id,
            "step": request.step,
            "week": meter.week,
            "costs": costs,
            "units_given": request.units,
            "units": metered.units,
            "breakdown": metered.breakdown,
            "result": metered.result,
            "capped": metered.capped,
            "overflow": result.overflow,
            "used": result.used,
            "quota": result.quota,
            "balance": result.balance,
            "plan_id": meter.plan_id,
            "ratio_version": self.config.meter.ratio_version,
            "hold_id": request.hold_id,
            "created_at": now,
        }
