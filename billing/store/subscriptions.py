"""Subscription state (SPEC §5.4), kept per Stripe subscription and derived per organization.

- `stripe_subscriptions`, `_id` = the Stripe subscription id: `org_id`, `customer`, `status`,
  `plan_id` (the plan its prices pay for; kept when a price is unknown), `past_due_since`,
  `current_period_start`, and one ordering marker per event family (`markers.subscription`,
  `markers.invoice`: `{created, event_id}`), so events of two subscriptions never make each other
  stale.
- `subscriptions`, `_id` = the organization id: the standing derived from all of them
  (`billing.stripe.subscriptions.standing`): `status` (`none` when the document is absent),
  `past_due_since`, `current_period_start`, `stripe_subscription_id` (the subscription giving the
  plan) and `stripe_customer_id` (the customer link of SPEC §5.5). The plan itself is the
  account's `plan_id`, changed through `billing.store.meters.apply_plan_change_in`.
- the account keeps a copy of `status` and `past_due_since` (`standing`), written in the same
  transaction as `subscriptions` by `refresh_in`, the one writer of the standing: the quota gate,
  a balance hold and a week's opening plan read it with the account they read anyway.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from functools import partial
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError, DuplicateKeyError

from billing.config import BillingConfig
from billing.errors import OrgNotFound
from billing.store.database import DUPLICATE_KEY, Database, Doc
from billing.store.documents import STANDING, standing_doc
from billing.store.transactions import run_in_transaction
from billing.stripe.events import Marker
from billing.stripe.subscriptions import Standing, SubscriptionView, standing

#: Standings to migrate written per bulk write by the start-up migration.
MIGRATION_PAGE = 500


def view(doc: Doc) -> SubscriptionView:
    marker = Marker.from_doc((doc.get("markers") or {}).get("subscription"))
    return SubscriptionView(
        id=str(doc["_id"]), status=str(doc.get("status") or "incomplete"),
        plan_id=doc.get("plan_id"), past_due_since=doc.get("past_due_since"),
        period_start=doc.get("current_period_start"), since=marker.created if marker else 0,
        seats=int(doc.get("seats") or 1),
    )


async def linked_customer(db: Database, org_id: str,
                          session: AsyncClientSession | None = None) -> str | None:
    """The organization's Stripe customer (the customer link of SPEC §5.5)."""
    standing = await db.subscriptions.find_one({"_id": org_id}, {"stripe_customer_id": 1},
                                               session=session)
    customer = (standing or {}).get("stripe_customer_id")
    return str(customer) if customer else None


class Subscriptions:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def link_customer(self, org_id: str, customer_id: str, now: datetime) -> str:
        """Link a customer the engine created for the organization, unless one is linked
        already (a concurrent request, or a subscription's customer): the linked one wins and is
        answered."""
        # Linked meanwhile: the filter does not match and the upsert collides on `_id`.
        with contextlib.suppress(DuplicateKeyError):
            await self.db.subscriptions.update_one(
                {"_id": org_id, "stripe_customer_id": None},
                {"$set": {"stripe_customer_id": customer_id, "updated_at": now},
                 "$setOnInsert": {"created_at": now}},
                upsert=True)
        linked = await linked_customer(self.db, org_id)
        assert linked is not None
        return linked

    async def get(self, org_id: str, session: AsyncClientSession | None = None) -> Doc | None:
        """The organization's standing."""
        return await self.db.subscriptions.find_one({"_id": org_id}, session=session)

    async def subscription(
        self, subscription_id: str, session: AsyncClientSession | None = None
    ) -> Doc | None:
        return await self.db.stripe_subscriptions.find_one({"_id": subscription_id},
                                                           session=session)

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

    async def orgs_for_customer(
        self, customer_id: str | None, session: AsyncClientSession | None = None
    ) -> list[str]:
        """Every organization linked to a Stripe customer, in id order: one customer may pay for
        several (SPEC 5.5)."""
        if not customer_id:
            return []
        cursor = self.db.subscriptions.find(
            {"stripe_customer_id": customer_id}, {"_id": 1}, session=session).sort("_id", 1)
        return [str(doc["_id"]) async for doc in cursor]

    @staticmethod
    def marker(doc: Doc | None, family: str) -> Marker | None:
        return Marker.from_doc(((doc or {}).get("markers") or {}).get(family))

    async def save_in(
        self,
        session: AsyncClientSession,
        subscription_id: str,
        org_id: str,
        *,
        fields: dict[str, Any],
        now: datetime,
        family: str | None = None,
        marker: Marker | None = None,
    ) -> None:
        """Set one subscription's `fields` and advance its family's marker (the caller checked
        it is newer)."""
        update: dict[str, Any] = {**fields, "org_id": org_id, "updated_at": now}
        if family is not None and marker is not None:
            update[f"markers.{family}"] = marker.to_doc()
        await self.db.stripe_subscriptions.update_one(
            {"_id": subscription_id},
            {"$set": update, "$setOnInsert": {"created_at": now}},
            upsert=True,
            session=session,
        )

    async def of_org(self, org_id: str, session: AsyncClientSession | None = None) -> list[Doc]:
        cursor = self.db.stripe_subscriptions.find({"org_id": org_id}, session=session)
        return [doc async for doc in cursor]

    async def refresh_in(
        self,
        session: AsyncClientSession,
        org_id: str,
        config: BillingConfig,
        *,
        current_plan: str | None,
        now: datetime,
        link: dict[str, Any] | None = None,
    ) -> Standing:
        """Derive the organization's standing from all its subscriptions and write it (with the
        customer `link` fields, when given), and its copy on the account. Returns it; the caller
        moves the plan.

        The account must exist: a Stripe event opens it first (`Accounts.ensure_in`), so an
        organization that registers after its subscription's events finds their standing on
        it. Without one this raises `OrgNotFound` rather than keep a standing the gate and the
        holds would not see."""
        subs = [view(doc) for doc in await self.of_org(org_id, session)]
        found = standing(config, subs, current_plan=current_plan)
        copied = await self.db.accounts.update_one(
            {"_id": org_id}, {"$set": {STANDING: standing_doc(found.status, found.past_due_since)}},
            session=session)
        if copied.matched_count == 0:
            raise OrgNotFound(org_id)
        await self.db.subscriptions.update_one(
            {"_id": org_id},
            {
                "$set": {
                    "status": found.status,
                    "past_due_since": found.past_due_since,
                    "current_period_start": found.period_start,
                    "stripe_subscription_id": found.subscription_id,
                    "updated_at": now,
                    **(link or {}),
                },
                "$setOnInsert": {"created_at": now},
            },
            upsert=True,
            session=session,
        )
        return found

    async def past_due_page(self, cutoff: datetime, after: str | None, limit: int) -> list[str]:
        """Organizations with a subscription past due since `cutoff` or earlier, paged by id
        (dunning)."""
        query: Doc = {"status": "past_due", "past_due_since": {"$lte": cutoff}}
        if after is not None:
            query["org_id"] = {"$gt": after}
        cursor = self.db.stripe_subscriptions.find(query, {"org_id": 1}).sort("org_id", 1)
        orgs: list[str] = []
        async for doc in cursor:
            if doc["org_id"] not in orgs:
                orgs.append(str(doc["org_id"]))
            if len(orgs) == limit:
                break
        return orgs

    async def mark_unpaid_in(
        self, session: AsyncClientSession, org_id: str, cutoff: datetime, now: datetime
    ) -> bool:
        """`past_due` -> `unpaid` for the organization's subscriptions still past due since
        `cutoff` at write time (a payment that just arrived leaves them alone)."""
        result = await self.db.stripe_subscriptions.update_many(
            {"org_id": org_id, "status": "past_due", "past_due_since": {"$lte": cutoff}},
            {"$set": {"status": "unpaid", "unpaid_at": now, "updated_at": now}},
            session=session,
        )
        return result.modified_count > 0

    async def migrate(self) -> int:
        """Give every organization whose standing names a subscription that has no state of its
        own yet (written before subscriptions were kept one by one) that state. Idempotent, and
        run at every start, so it reads each collection once: the ids of the subscriptions kept
        (on the embedded server a scan of ids costs a fortieth of looking them up by `$in`), then
        the standings by page, writing only those still to do."""
        kept = {doc["_id"] async for doc in self.db.stripe_subscriptions.find({}, {"_id": 1})}
        moved = 0
        cursor = self.db.subscriptions.find({"stripe_subscription_id": {"$type": "string"}},
                                            batch_size=MIGRATION_PAGE)
        page: list[Doc] = []
        async for doc in cursor:
            if doc["stripe_subscription_id"] not in kept:
                page.append(doc)
            if len(page) == MIGRATION_PAGE:
                moved += await self._keep_one_by_one(page)
                page = []
        return moved + (await self._keep_one_by_one(page) if page else 0)

    async def copy_standings(self) -> int:
        """Give every account the copy of its standing that `refresh_in` writes, where it is
        missing (a release without it) or differs (written meanwhile by a process of such a
        release). Idempotent, and run at every start, so it reads each collection once and
        compares; the accounts to fix are written by page, each in a transaction that reads
        their standings again, so a standing `refresh_in` writes meanwhile is never overwritten
        by an older one (the two write the account: one restarts). Returns the accounts
        changed."""
        wanted = {doc["_id"]: _copied(doc) async for doc in self.db.subscriptions.find(
            {}, {"status": 1, "past_due_since": 1}, batch_size=MIGRATION_PAGE)}
        differing = [doc["_id"] async for doc in self.db.accounts.find(
            {}, {STANDING: 1}, batch_size=MIGRATION_PAGE)
            if doc.get(STANDING) != wanted.get(doc["_id"])]
        changed = 0
        for start in range(0, len(differing), MIGRATION_PAGE):
            page = differing[start:start + MIGRATION_PAGE]
            changed += await run_in_transaction(self.db.client,
                                                partial(self._copy_standings, page))
        return changed

    async def _copy_standings(self, orgs: list[str], session: AsyncClientSession) -> int:
        cursor = self.db.subscriptions.find({"_id": {"$in": orgs}},
                                            {"status": 1, "past_due_since": 1}, session=session)
        found = {doc["_id"]: _copied(doc) async for doc in cursor}
        written = await self.db.accounts.bulk_write([  # one already right is not modified
            UpdateOne({"_id": org}, {"$set": {STANDING: copy}} if copy else
                      {"$unset": {STANDING: ""}})
            for org, copy in ((org, found.get(org)) for org in orgs)],
            ordered=False, session=session)
        return written.modified_count

    async def _keep_one_by_one(self, missing: list[Doc]) -> int:
        plans = {doc["_id"]: doc.get("plan_id") async for doc in self.db.accounts.find(
            {"_id": {"$in": [doc["_id"] for doc in missing]}}, {"plan_id": 1})}
        upserts = [
            UpdateOne({"_id": doc["stripe_subscription_id"]}, {"$setOnInsert": {
                "org_id": doc["_id"], "customer": doc.get("stripe_customer_id"),
                "status": doc.get("status"), "plan_id": plans.get(doc["_id"]),
                "past_due_since": doc.get("past_due_since"),
                "current_period_start": doc.get("current_period_start"),
                "markers": doc.get("markers") or {}, "created_at": doc.get("created_at"),
            }}, upsert=True) for doc in missing
        ]
        try:
            result = await self.db.stripe_subscriptions.bulk_write(upserts, ordered=False)
        except BulkWriteError as exc:  # another worker starting at once kept some first
            if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
                raise
            return int(exc.details["nUpserted"])
        return result.upserted_count


def _copied(standing: Doc) -> Doc | None:
    """The account's copy of a `subscriptions` document's standing; None without a status (a
    customer linked before any subscription: no standing)."""
    if standing.get("status") is None:
        return None
    return standing_doc(standing["status"], standing.get("past_due_since"))
