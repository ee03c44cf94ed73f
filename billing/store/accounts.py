"""Accounts: one per organization, holding the extras balance, the debt and the plan."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.config import BillingConfig
from billing.errors import InvalidInput, OrgNotFound
from billing.ledger import EntryKind
from billing.store.database import Database, Doc
from billing.store.ledger import Ledger
from billing.store.transactions import run_in_transaction

ORG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SIGNUP_GRANT_KEY = "grant:signup"


def check_org_id(org_id: object) -> str:
    """Organization ids are plain strings of `^[A-Za-z0-9_.-]{1,64}$` (never a query operator)."""
    if not isinstance(org_id, str) or not ORG_ID.fullmatch(org_id):
        raise InvalidInput("org_id must match ^[A-Za-z0-9_.-]{1,64}$", code="INVALID_ORG_ID")
    return org_id


def new_account(org_id: str, plan_id: str, now: datetime) -> Doc:
    return {
        "_id": org_id,
        "balance": 0,
        "usage_debt": 0,
        "other_debt": 0,
        "seq": 0,
        "lots": [],
        "plan_id": plan_id,
        "created_at": now,
        "updated_at": now,
    }


@dataclass(frozen=True)
class Registration:
    org_id: str
    plan_id: str
    created: bool


class Accounts:
    def __init__(self, db: Database, config: BillingConfig) -> None:
        self.db = db
        self.config = config
        self.ledger = Ledger(db)

    async def ensure_in(
        self, session: AsyncClientSession | None, org_id: str, now: datetime
    ) -> bool:
        """Create the account on the default plan if it does not exist; True when created."""
        result = await self.db.accounts.update_one(
            {"_id": org_id},
            {"$setOnInsert": self.opening(org_id, now)},
            upsert=True,
            session=session,
        )
        return result.upserted_id is not None

    def opening(self, org_id: str, now: datetime) -> Doc:
        """The account an organization opens when it is first named: on the default plan."""
        return new_account(check_org_id(org_id), self.config.default_plan.id, now)

    async def register(self, org_id: str, now: datetime) -> Registration:
        """`PUT /v1/orgs/{org}`: create the account and write the signup grant once.

        Only a registration grants: an organization first named by a Stripe event gets none.
        """
        check_org_id(org_id)

        async def work(session: AsyncClientSession) -> Registration:
            created = await self.ensure_in(session, org_id, now)
            account = await self.db.accounts.find_one({"_id": org_id}, session=session)
            assert account is not None
            plan = self.config.plan(account.get("plan_id"))
            if created and plan.signup_grant > 0:
                await self.ledger.write_in(
                    session, org_id, key=SIGNUP_GRANT_KEY, kind=EntryKind.GRANT,
                    amount=plan.signup_grant, now=now, memo=f"signup grant of plan {plan.id}",
                )
            return Registration(org_id=org_id, plan_id=plan.id, created=created)

        return await run_in_transaction(self.db.client, work)

    async def get(self, org_id: str) -> Doc:
        check_org_id(org_id)
        account = await self.db.accounts.find_one({"_id": org_id})
        if account is None:
            raise OrgNotFound(org_id)
        return account

    async def page_ids(self, after: str | None, limit: int) -> list[str]:
        """Organization ids in `_id` order, for sweeps that page through every account."""
        query: Doc = {} if after is None else {"_id": {"$gt": after}}
        cursor = self.db.accounts.find(query, {"_id": 1}).sort("_id", 1).limit(limit)
        return [doc["_id"] async for doc in cursor]
