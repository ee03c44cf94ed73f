"""Start-up migrations (`billing/store/migrations.py`): each step brings older documents to the
current shape, and a step that finds nothing left to change is recorded and not run again.
Which steps are recorded is per database, so each test has its own (`fresh_db`)."""

from __future__ import annotations

import uuid
from datetime import datetime

from bson import ObjectId

from billing.config import BillingConfig
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.migrations import STEPS, migrate
from billing.store.subscriptions import Subscriptions

SUBSCRIPTIONS = "subscriptions kept one by one"
NOTIFICATIONS = "notifications numbered"


async def older_release_data(db: Database, config: BillingConfig, now: datetime) -> str:
    """An organization as an older release left it: a standing naming a subscription that has
    no state of its own, and a notification without `seq`."""
    org = f"org-mig-{uuid.uuid4().hex[:8]}"
    await Accounts(db, config).register(org, now)
    await db.accounts.update_one({"_id": org}, {"$set": {"plan_id": "pro"}})
    await db.subscriptions.update_one(
        {"_id": org},
        {"$set": {"stripe_subscription_id": f"sub_{org}", "stripe_customer_id": f"cus_{org}",
                  "status": "past_due", "past_due_since": now, "created_at": now}},
        upsert=True)
    await db.notifications.insert_one({"_id": ObjectId(), "org_id": org, "type": "payment.failed",
                                       "key": f"old:{org}", "payload": {}, "created_at": now})
    return org


async def test_older_data_is_migrated_then_the_steps_are_recorded_and_skipped(
    fresh_db: Database, config: BillingConfig, now: datetime
) -> None:
    db = fresh_db
    org = await older_release_data(db, config, now)
    subscriptions = Subscriptions(db)

    assert await migrate(db, subscriptions) == {SUBSCRIPTIONS: 1, NOTIFICATIONS: 1}
    kept = await db.stripe_subscriptions.find_one({"_id": f"sub_{org}"})
    assert kept is not None
    assert (kept["org_id"], kept["customer"], kept["status"], kept["plan_id"]) == (
        org, f"cus_{org}", "past_due", "pro")
    note = await db.notifications.find_one({"key": f"old:{org}"})
    assert note is not None and note["seq"] == 1
    assert await db.migrations.count_documents({}) == 0, "a step that changed data is not done"

    assert await migrate(db, subscriptions) == {SUBSCRIPTIONS: 0, NOTIFICATIONS: 0}
    assert {d["_id"] async for d in db.migrations.find()} == set(STEPS)

    # Recorded: a later start reads nothing (documents of an older release written after the
    # upgrade finished are not looked for again, README "Start-up migrations").
    late = await older_release_data(db, config, now)
    assert await migrate(db, subscriptions) == {}
    assert await db.stripe_subscriptions.find_one({"_id": f"sub_{late}"}) is None


async def test_a_database_without_older_data_records_every_step_at_the_first_start(
    fresh_db: Database,
) -> None:
    assert await migrate(fresh_db, Subscriptions(fresh_db)) == dict.fromkeys(STEPS, 0)
    assert await fresh_db.migrations.count_documents({}) == len(STEPS)
    assert await migrate(fresh_db, Subscriptions(fresh_db)) == {}
