"""The reconciliation's reads, its notifications and its report (collection `reports`).

One organization at a time, in bounded reads: its ledger entries are summed in chunks of at most
`chunk` sequence numbers outside any transaction (entries are immutable, so a sum up to a `seq`
never changes), then one short snapshot transaction reads the account, its lots, the entries
written since the last chunk, the week's meter and its subscriptions. A usage record or a
Stripe event committing meanwhile therefore cannot show up as a false divergence, and no
transaction reads an unbounded part of a busy organization's history.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.models import Divergence, LedgerSums, ReconcileReport, SubscriptionRef
from billing.reconcile import LedgerState, LotState, add_entries
from billing.store.books import notify
from billing.store.database import Database
from billing.store.documents import open_lots, units_left
from billing.store.transactions import run_in_transaction
from billing.stripe.subscriptions import STATUS_NONE
from billing.weeks import week_start

REPORT_KIND = "reconcile"
#: Sequence numbers per ledger read: a `seq` is one ledger transaction of the organization.
LEDGER_CHUNK = 1000
_ENTRY_FIELDS = {"_id": 0, "amount": 1, "draws": 1, "kind": 1, "key": 1, "created_at": 1}


@dataclass(frozen=True)
class OrgReadings:
    """What the checks of one organization compare, as of one snapshot."""

    ledger: LedgerState
    #: The week's metered overflow (its meter's `overflow`); None when the meter opened before
    #: meters counted it (`billing.store.meters.OVERFLOW_COUNTED`), so it cannot be compared.
    overflow: int | None
    #: The week's usage debits (`debit` entries keyed `usage:*`), as positive units.
    debited: int
    subscriptions: list[SubscriptionRef]


class _Behind(Exception):
    """More entries were written since the last chunk than one chunk holds."""

    def __init__(self, seq: int) -> None:
        self.seq = seq


class ReconcileStore:
    def __init__(self, db: Database, *, chunk: int = LEDGER_CHUNK) -> None:
        self.db = db
        self.chunk = chunk

    async def read_org(
        self, sums: LedgerSums, week: str, on_chunk: Callable[[LedgerSums], None],
    ) -> OrgReadings | None:
        """The organization's readings, its ledger summed on from `sums` (a fresh
        `LedgerSums(org_id=...)`, or the progress of an earlier attempt); `on_chunk` gets the
        sums after every chunk. None when the organization has no account."""
        start = week_start(week)
        end = start + timedelta(days=7)
        while True:
            account = await self.db.accounts.find_one({"_id": sums.org_id}, {"seq": 1})
            if account is None:
                return None
            sums = await self._sum_through(sums, int(account.get("seq", 0)), start, end,
                                           on_chunk)
            try:
                return await self._snapshot(sums, week, start, end)
            except _Behind as behind:
                sums = await self._sum_through(sums, behind.seq, start, end, on_chunk)

    async def _sum_through(
        self, sums: LedgerSums, seq: int, start: datetime, end: datetime,
        on_chunk: Callable[[LedgerSums], None],
    ) -> LedgerSums:
        """Add the entries up to `seq`, a chunk per read (outside any transaction)."""
        while sums.through_seq < seq:
            upto = min(sums.through_seq + self.chunk, seq)
            cursor = self.db.ledger.find(
                {"org_id": sums.org_id, "seq": {"$gt": sums.through_seq, "$lte": upto}},
                _ENTRY_FIELDS)
            sums = add_entries(sums, [doc async for doc in cursor], through_seq=upto,
                               week_start=start, week_end=end)
            on_chunk(sums)
        return sums

    async def _snapshot(
        self, sums: LedgerSums, week: str, start: datetime, end: datetime
    ) -> OrgReadings | None:
        """The account, lots, entries after `sums.through_seq`, meter and subscriptions of
        the organization in one snapshot transaction; raises `_Behind` when the entries after
        `sums` exceed a chunk (the transaction then reads nothing more)."""
        org_id = sums.org_id

        async def work(session: AsyncClientSession) -> OrgReadings | None:
            db = self.db
            account = await db.accounts.find_one(
                {"_id": org_id},
                {"balance": 1, "usage_debt": 1, "other_debt": 1, "seq": 1, "lots": 1},
                session=session)
            if account is None:
                return None
            seq = int(account.get("seq", 0))
            if seq - sums.through_seq > self.chunk:
                raise _Behind(seq)
            tail = db.ledger.find({"org_id": org_id, "seq": {"$gt": sums.through_seq}},
                                  _ENTRY_FIELDS, session=session)
            final = add_entries(sums, [doc async for doc in tail], through_seq=seq,
                                week_start=start, week_end=end)
            left = units_left(open_lots(account))
            lots = [LotState(id=lot["_id"], units=int(lot["units"]),
                             remaining=left.get(lot["_id"], 0),
                             repaid_debt=int(lot.get("repaid_debt", 0)),
                             drawn=final.drawn.get(lot["_id"], 0))
                    async for lot in db.lots.find(
                        {"org_id": org_id}, {"units": 1, "repaid_debt": 1}, session=session)]
            meter = await db.meters.find_one({"org_id": org_id, "week": week},
                                             {"overflow": 1, "overflow_counted": 1},
                                             session=session)
            subscriptions = sorted([doc async for doc in db.stripe_subscriptions.find(
                {"org_id": org_id}, {"status": 1, "plan_id": 1}, session=session)],
                key=lambda doc: str(doc["_id"]))
            return OrgReadings(
                ledger=LedgerState(
                    org_id=org_id, balance=int(account.get("balance", 0)),
                    usage_debt=int(account.get("usage_debt", 0)),
                    other_debt=int(account.get("other_debt", 0)),
                    entries_total=final.entries_total, lots=tuple(lots)),
                overflow=(None if meter is not None and not meter.get("overflow_counted")
                          else int((meter or {}).get("overflow", 0))),
                debited=final.week_usage_debits,
                subscriptions=[
                    SubscriptionRef(org_id=org_id, subscription_id=str(doc["_id"]),
                                    status=doc.get("status") or STATUS_NONE,
                                    plan_id=doc.get("plan_id"))
                    for doc in subscriptions],
            )

        return await run_in_transaction(self.db.client, work)

    async def recorded_events(self, event_ids: list[str]) -> set[str]:
        """The events among `event_ids` that have an outcome record (their effect is written)."""
        cursor = self.db.stripe_events.find({"_id": {"$in": event_ids}}, {"_id": 1})
        return {str(doc["_id"]) async for doc in cursor}

    async def notify_divergences(
        self, divergences: list[Divergence], *, report_id: str, started_at: datetime
    ) -> int:
        """One `reconcile.divergence` per organization, check and day: a re-run the same day
        finds the key and writes nothing. Returns how many were written."""
        day = started_at.date().isoformat()
        grouped: dict[tuple[str, str], list[Divergence]] = defaultdict(list)
        for divergence in divergences:
            grouped[(divergence.org_id, divergence.check)].append(divergence)
        written = 0
        for (org_id, check), found in grouped.items():
            payload: dict[str, Any] = {
                "date": day, "check": check, "report_id": report_id,
                "divergences": [d.model_dump(exclude={"org_id", "check"}) for d in found],
            }
            written += await notify(self.db, None, org_id=org_id, type="reconcile.divergence",
                                    key=f"reconcile.divergence:{day}:{check}", payload=payload,
                                    now=started_at)
        return written

    async def write_report(self, report: ReconcileReport) -> None:
        """Store the report under its id (a retried write replaces it with the same content)."""
        doc = report.model_dump(exclude={"report_id"})
        await self.db.reports.replace_one(
            {"_id": report.report_id}, {**doc, "created_at": report.started_at}, upsert=True)

    async def latest_report(self) -> ReconcileReport | None:
        doc = await self.db.reports.find_one({"kind": REPORT_KIND}, sort=[("created_at", -1)])
        if doc is None:
            return None
        return ReconcileReport.model_validate({**doc, "report_id": doc["_id"]})
