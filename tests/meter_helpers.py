"""The metering configuration and requests the metering and weekly-reset tests share."""

from __future__ import annotations

from datetime import datetime

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession

from billing.config import EXAMPLE_CONFIG, BillingConfig, parse_config
from billing.metering import UsageRequest
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.meters import Meters
from billing.store.subscriptions import Subscriptions
from billing.store.transactions import run_in_transaction


async def put_on_plan(meters: Meters, org: str, plan_id: str, now: datetime) -> bool:
    return await run_in_transaction(
        meters.db.client, lambda s: meters.apply_plan_change_in(s, org, plan_id, now)
    )


async def unregistered(accounts: Accounts, org: str, now: datetime) -> None:
    """An account as a Stripe event creates it: no signup grant."""
    await accounts.ensure_in(None, org, now)


async def subscribed(db: Database, config: BillingConfig, org: str, status: str,
                     past_due_since: datetime | None, now: datetime) -> None:
    """Put the organization's one Stripe subscription (priced on no plan: the plan stays) in
    `status` and write the standing it derives as a Stripe event or dunning does
    (`Subscriptions.refresh_in`: `subscriptions` and the account's copy)."""
    subscriptions = Subscriptions(db)

    async def work(session: AsyncClientSession) -> None:
        await subscriptions.save_in(session, f"sub_{org}", org, now=now, fields={
            "status": status, "past_due_since": past_due_since})
        account = await db.accounts.find_one({"_id": org}, {"plan_id": 1}, session=session)
        await subscriptions.refresh_in(session, org, config, now=now,
                                       current_plan=(account or {}).get("plan_id"))

    await run_in_transaction(db.client, work)


def usage(org: str, run: str, **fields: object) -> UsageRequest:
    return UsageRequest.model_validate({"org_id": org, "run_id": run, **fields})


TINY = '\n[[plans]]\nid = "tiny"\nmeter_quota = 100\nstripe_price_ids = ["price_tiny"]\n'


@pytest.fixture(scope="session")
def meter_config() -> BillingConfig:
    """The example configuration plus a plan `tiny` with a weekly quota of 100 units."""
    return parse_config(EXAMPLE_CONFIG.read_text() + TINY)
