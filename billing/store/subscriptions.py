"""Subscription state per organization (SPEC §5.4): one `subscriptions` document, `_id` = org id.

Fields: `status` (`none` when the document is absent), `past_due_since`, `current_period_start`,
`stripe_customer_id`, `stripe_subscription_id`, and one ordering marker per event family
(`markers.subscription`, `markers.invoice`: `{created, event_id}`). The plan itself is the
account's `plan_id`; plan changes go through `billing.store.meters.apply_plan_change_in`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.store.database import Database, Doc
from billing.stripe_events import Marker

STATUS_NONE = "none"


class Subscriptions:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, org_id: str, session: AsyncClientSession | None = None) -> Doc | None:
        return await self.db.subscriptions.find_one({"_id": org_id}, session=session)

    async def org_for_customer(
        self, customer_id: str | None, session: AsyncClientSession | None = None
    ) -> str | None:
        """The organization linked to a Stripe customer (the fallback of SPEC §5.5)."""
        if not customer_id:
            return None
        doc = await self.db.subscriptions.find_one(
            {"stripe_customer_id": customer_id}, {"_id": 1}, session=session
        )
        return str(doc["_id"]) if doc else None

    @staticmethod
    def marker(doc: Doc | None, family: str) -> Marker | None:
        return Marker.from_doc(((doc or {}).get("markers") or {}).get(family))

    async def update_in(
        self,
        session: AsyncClientSession,
        org_id: str,
        *,
        family: str,
        marker: Marker,
        fields: dict[str, Any],
        now: datetime,
    ) -> None:
        """Set `fields` and advance the family's marker (the caller checked it is newer)."""
        await self.db.subscriptions.update_one(
            {"_id": org_id},
            {
                "$set": {**fields, f"markers.{family}": marker.to_doc(), "updated_at": now},
                "$setOnInsert": {"created_at": now},
            },
            upsert=True,
            session=session,
        )

    async def past_due_page(self, cutoff: datetime, after: str | None, limit: int) -> list[str]:
        """Organizations past due since `cutoff` or earlier, paged by id (dunning)."""
        query: Doc = {"status": "past_due", "past_due_since": {"$lte": cutoff}}
        if after is not None:
            query["_id"] = {"$gt": after}
        cursor = self.db.subscriptions.find(query, {"_id": 1}).sort("_id", 1).limit(limit)
        return [str(doc["_id"]) async for doc in cursor]

    async def mark_unpaid_in(
        self, session: AsyncClientSession, org_id: str, cutoff: datetime, now: datetime
    ) -> bool:
        """`past_due` -> `unpaid`, only if it is still past due since `cutoff` at write time
        (a payment that just arrived leaves it alone)."""
        result = await self.db.subscriptions.update_one(
            {"_id": org_id, "status": "past_due", "past_due_since": {"$lte": cutoff}},
            {"$set": {"status": "unpaid", "unpaid_at": now, "updated_at": now}},
            session=session,
        )
        return result.modified_count == 1
