"""The metering configuration and requests the metering and weekly-reset tests share."""

from __future__ import annotations

from datetime import datetime

import pytest

from billing.config import EXAMPLE_CONFIG, BillingConfig, parse_config
from billing.metering import UsageRequest
from billing.store.accounts import Accounts
from billing.store.meters import Meters
from billing.store.transactions import run_in_transaction


async def put_on_plan(meters: Meters, org: str, plan_id: str, now: datetime) -> bool:
    return await run_in_transaction(
        meters.db.client, lambda s: meters.apply_plan_change_in(s, org, plan_id, now)
    )


async def unregistered(accounts: Accounts, org: str, now: datetime) -> None:
    """An account as a Stripe event creates it: no signup grant."""
    await accounts.ensure_in(None, org, now)


def usage(org: str, run: str, **fields: object) -> UsageRequest:
    return UsageRequest.model_validate({"org_id": org, "run_id": run, **fields})


TINY = '\n[[plans]]\nid = "tiny"\nmeter_quota = 100\nstripe_price_ids = ["price_tiny"]\n'


@pytest.fixture(scope="session")
def meter_config() -> BillingConfig:
    """The example configuration plus a plan `tiny` with a weekly quota of 100 units."""
    return parse_config(EXAMPLE_CONFIG.read_text() + TINY)
