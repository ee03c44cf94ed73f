"""The reconciliation's reads, its notifications and its report (collection `reports`).

A page of organizations is read in one snapshot transaction, so a usage record or a Stripe event
committing meanwhile cannot show up as a false divergence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection

from billing.ledger import EntryKind
from billing.models import Divergence, ReconcileReport, SubscriptionRef
from billing.reconcile import LedgerState, LotState
from billing.store.database import Database, Doc
from billing.store.notifications import notify
from billing.store.transactions import run_in_transaction
from billing.stripe.subscriptions import STATUS_NONE
from billing.weeks import week_start

REPORT_KIND = "reconcile"


@dataclass(frozen=True)
class OrgReadings:
    """What the checks of one organization compare, read in one snapshot."""

    ledger: LedgerState
    #: The week's metered overflow: the sum of its usage records' `overflow`.
    overflow: int
    #: The week's usage debits (`debit` entries keyed `usage:*`), as positive units.
    debited: int


@dataclass(frozen=True)
class PageReadings:
    orgs: list[OrgReadings]
    subscriptions: list[SubscriptionRef]


async def _sums(
    collection: AsyncCollection[Doc], session: AsyncClientSession, match: Doc, key: str,
    value: str, unwind: str | None = None,
) -> dict[str, int]:
    """`{key: sum(value)}` over the documents matching `match` (after `$unwind`, if given)."""
    pipeline: list[Doc] = [{"$match": match}]
    if unwind is not None:
        pipeline.append({"$unwind": unwind})
    pipeline.append({"$group": {"_id": key, "total": {"$sum": value}}})
    cursor = await collection.aggregate(pipeline, session=session)
    return {doc["_id"]: int(doc["total"]) async for doc in cursor}


class ReconcileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def read_page(self, org_ids: list[str], week: str) -> PageReadings:
        """The ledger, the week's meter and the subscription of each organization."""
        start = week_start(week)
        end = start + timedelta(days=7)
        orgs: Doc = {"$in": org_ids}

        async def work(session: AsyncClientSession) -> PageReadings:
            db = self.db
            accounts = {doc["_id"]: doc async for doc in db.accounts.find(
                {"_id": orgs}, {"balance": 1, "usage_debt": 1, "other_debt": 1, "plan_id": 1},
                session=session)}
            totals = await _sums(db.ledger, session, {"org_id": orgs}, "$org_id", "$amount")
            drawn = await _sums(db.ledger, session, {"org_id": orgs, "draws": {"$exists": True}},
                                "$draws.lot_id", "$draws.units", unwind="$draws")
            overflow = await _sums(db.usage, session, {"org_id": orgs, "week": week},
                                   "$org_id", "$overflow")
            debited = await _sums(
                db.ledger, session,
                {"org_id": orgs, "kind": EntryKind.DEBIT.value,
                 "created_at": {"$gte": start, "$lt": end}, "key": {"$regex": "^usage:"}},
                "$org_id", "$amount")
            lots: dict[str, list[LotState]] = defaultdict(list)
            async for lot in db.lots.find({"org_id": orgs},
                                          {"org_id": 1, "units": 1, "remaining": 1,
                                           "repaid_debt": 1}, session=session):
                lots[lot["org_id"]].append(LotState(
                    id=lot["_id"], units=int(lot["units"]), remaining=int(lot["remaining"]),
                    repaid_debt=int(lot.get("repaid_debt", 0)), drawn=drawn.get(lot["_id"], 0)))
            subscriptions = [doc async for doc in db.stripe_subscriptions.find(
                {"org_id": orgs}, {"org_id": 1, "status": 1, "plan_id": 1}, session=session)]
            readings = [
                OrgReadings(
                    ledger=LedgerState(
                        org_id=org, balance=int(account.get("balance", 0)),
                        usage_debt=int(account.get("usage_debt", 0)),
                        other_debt=int(account.get("other_debt", 0)),
                        entries_total=totals.get(org, 0), lots=tuple(lots[org])),
                    overflow=overflow.get(org, 0),
                    debited=-debited.get(org, 0),
                )
                for org, account in sorted(accounts.items())
            ]
            refs = [
                SubscriptionRef(org_id=doc["org_id"], subscription_id=str(doc["_id"]),
                                status=doc.get("status") or STATUS_NONE,
                                plan_id=doc.get("plan_id"))
                for doc in sorted(subscriptions, key=lambda d: (str(d["org_id"]), str(d["_id"])))
            ]
            return PageReadings(orgs=readings, subscriptions=refs)

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
