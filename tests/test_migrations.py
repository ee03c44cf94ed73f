"""Start-up migrations (`billing/store/migrations.py`): every worker start brings documents an
older release wrote to the current shape, once, however many workers start together."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from bson import ObjectId
from ledger_checks import assert_consistent
from meter_helpers import usage
from pymongo import ASCENDING, IndexModel

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.holds import Hold, HoldRequest, Refusal
from billing.ledger import EntryKind
from billing.metering import PAYMENT_PAST_DUE
from billing.store.accounts import Accounts, new_account
from billing.store.database import (
    LEGACY_LOTS_REMAINING,
    LOTS_PAYMENT_INDEXES,
    SWEEP_AT,
    Database,
    Doc,
)
from billing.store.documents import LotTerms
from billing.store.holds import active_in, release
from billing.store.ledger import Ledger
from billing.store.meters import Meters
from billing.store.migrations import migrate
from billing.store.subscriptions import MIGRATION_PAGE, Subscriptions

SUBSCRIPTIONS = "subscriptions kept one by one"
STANDINGS = "standings copied onto accounts"
NOTIFICATIONS = "notifications numbered"
LOT_PAYMENTS = "purchased lots indexed in lot_payments"
HOLDS = "active holds moved to meters"
LOTS = "accounts given their open lots"


def changed(subscriptions: int = 0, notifications: int = 0, standings: int = 0
            ) -> dict[str, int]:
    """What `migrate` answers when only subscriptions, notifications and standings had to
    change."""
    return {SUBSCRIPTIONS: subscriptions, STANDINGS: standings, NOTIFICATIONS: notifications,
            LOT_PAYMENTS: 0, HOLDS: 0, LOTS: 0}


async def older_release_data(db: Database, config: BillingConfig, now: datetime) -> str:
    """An organization as an older release left it: a standing naming a subscription that has
    no state of its own and not copied onto the account, and a notification without `seq`."""
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


async def test_older_data_is_migrated_once(
    fresh_db: Database, config: BillingConfig, now: datetime
) -> None:
    db = fresh_db
    org = await older_release_data(db, config, now)
    subscriptions = Subscriptions(db)

    assert await migrate(db, subscriptions, config) == changed(1, 1, 1)
    kept = await db.stripe_subscriptions.find_one({"_id": f"sub_{org}"})
    assert kept is not None
    assert (kept["org_id"], kept["customer"], kept["status"], kept["plan_id"]) == (
        org, f"cus_{org}", "past_due", "pro")
    note = await db.notifications.find_one({"key": f"old:{org}"})
    assert note is not None and note["seq"] == 1
    assert await migrate(db, subscriptions, config) == changed()

    # Written by an older process still running during a rolling upgrade: the next start takes it.
    late = await older_release_data(db, config, now)
    assert await migrate(db, subscriptions, config) == changed(1, 1, 1)
    assert await db.stripe_subscriptions.count_documents({"_id": f"sub_{late}"}) == 1


async def test_workers_starting_together_keep_each_subscription_once(
    fresh_db: Database, config: BillingConfig, now: datetime
) -> None:
    """Standings over several pages, some subscriptions already kept, two migrations at once."""
    db = fresh_db
    orgs = [f"org-mig-{i:04d}" for i in range(2 * MIGRATION_PAGE + 30)]
    await db.subscriptions.insert_many([
        {"_id": org, "stripe_subscription_id": f"sub_{org}", "status": "active",
         "created_at": now} for org in orgs])
    await db.stripe_subscriptions.insert_many(
        [{"_id": f"sub_{org}", "org_id": org, "status": "canceled"} for org in orgs[::7]])
    subscriptions = Subscriptions(db)

    results = await asyncio.gather(migrate(db, subscriptions, config),
                                   migrate(db, subscriptions, config))
    assert sum(r[SUBSCRIPTIONS] for r in results) == len(orgs) - len(orgs[::7])
    assert await db.stripe_subscriptions.count_documents({}) == len(orgs)
    kept_before = await db.stripe_subscriptions.find_one({"_id": f"sub_{orgs[0]}"})
    assert kept_before is not None and kept_before["status"] == "canceled"
    moved = await db.stripe_subscriptions.find_one({"_id": f"sub_{orgs[-2]}"})
    assert moved is not None and (moved["org_id"], moved["status"]) == (orgs[-2], "active")
    assert await migrate(db, subscriptions, config) == changed()


async def test_standings_are_copied_onto_accounts_once(
    fresh_db: Database, config: BillingConfig, now: datetime
) -> None:
    """Accounts of a release that kept the subscription standing on `subscriptions` alone get
    its copy, each once however many workers start together, and holds are refused or granted
    by it; a standing an older process changes afterwards is copied by the next start."""
    db = fresh_db
    orgs = [f"org-std-{i:04d}" for i in range(MIGRATION_PAGE + 30)]
    await db.accounts.insert_many([new_account(org, "pro", now) for org in orgs])
    past_due = {"status": "past_due", "past_due_since": now - timedelta(days=8)}
    standings = {org: past_due if i % 3 == 0 else {"status": "active", "past_due_since": None}
                 for i, org in enumerate(orgs[:-20])}
    linked_only = orgs[-20:-10]  # a customer linked, no subscription yet: no standing
    await db.subscriptions.insert_many(
        [{"_id": org, **standing} for org, standing in standings.items()]
        + [{"_id": org, "stripe_customer_id": f"cus_{org}"} for org in linked_only]
        + [{"_id": "org-std-no-account", **past_due}])

    results = await asyncio.gather(migrate(db, Subscriptions(db), config),
                                   migrate(db, Subscriptions(db), config))
    assert sum(r[STANDINGS] for r in results) == len(standings)
    copies = {doc["_id"]: doc.get("standing") async for doc in db.accounts.find()}
    assert copies == {org: standings.get(org) for org in orgs}
    assert await db.accounts.count_documents({"_id": "org-std-no-account"}) == 0
    meters, first = Meters(db, config), orgs[0]
    refused = await meters.hold(first, HoldRequest(hold_id="h1", units=10), now)
    assert refused == Refusal(PAYMENT_PAST_DUE, 500_000)
    assert isinstance(await meters.hold(orgs[1], HoldRequest(hold_id="h1", units=10), now), Hold)
    assert await migrate(db, Subscriptions(db), config) == changed()

    # Paid, as written by a process of the older release still running: the next start copies it.
    await db.subscriptions.update_one({"_id": first}, {"$set": {"status": "active",
                                                                "past_due_since": None}})
    assert await migrate(db, Subscriptions(db), config) == changed(standings=1)
    assert isinstance(await meters.hold(first, HoldRequest(hold_id="h2", units=10), now), Hold)


async def test_purchased_lots_move_their_indexes_to_lot_payments(
    fresh_db: Database, config: BillingConfig, now: datetime
) -> None:
    """A database of a release that indexed payment intents and charges on `lots`: the start
    copies each purchased lot into `lot_payments` and only then drops those indexes, so refunds
    and disputes still find the lots, and a purchase line still cannot be credited twice."""
    db = fresh_db
    org = f"org-mig-{uuid.uuid4().hex[:8]}"
    await Accounts(db, config).register(org, now)
    ledger = Ledger(db)
    await ledger.write(org, key="payment:pi_old", kind=EntryKind.TOPUP, amount=500, now=now,
                       terms=LotTerms(payment_intent="pi_old", charge="ch_old", price_cents=900,
                                      line=1))
    await db.lot_payments.delete_many({})  # written before `lot_payments` existed
    await db.lots.create_indexes([
        IndexModel([("payment_intent", ASCENDING)], name="payment_intent"),
        IndexModel([("payment_intent", ASCENDING), ("line", ASCENDING)],
                   name="one_lot_per_purchase_line", unique=True, partialFilterExpression={
                       "kind": "topup", "payment_intent": {"$type": "string"}}),
        IndexModel([("charge", ASCENDING)], name="charge")])
    assert await ledger.find_purchase_lots(payment_intent="pi_old", charge=None) == []

    moved = await migrate(db, Subscriptions(db), config)
    assert moved[LOT_PAYMENTS] == 1
    assert not set(LOTS_PAYMENT_INDEXES) & set(await db.lots.index_information())
    by_intent = await ledger.find_purchase_lots(payment_intent="pi_old", charge=None)
    by_charge = await ledger.find_purchase_lots(payment_intent=None, charge="ch_old")
    assert [lot["units"] for lot in by_intent] == [lot["units"] for lot in by_charge] == [500]
    assert (await migrate(db, Subscriptions(db), config))[LOT_PAYMENTS] == 0


async def legacy_holds(db: Database, config: BillingConfig, at: datetime) -> tuple[str, str]:
    """Two organizations as the release that kept active holds in `holds` left them (the
    `active` index, `until` while a hold counts, `hold_locks`): one with this week's meter open,
    one without; a hold settled and one expired beside the ones that count."""
    await db.holds.create_indexes([IndexModel([("org_id", ASCENDING), ("until", ASCENDING)],
                                              name="active")])
    metered, unmetered = (f"org-mig-{uuid.uuid4().hex[:8]}" for _ in range(2))
    meters = Meters(db, config)
    for org in (metered, unmetered):
        await Accounts(db, config).register(org, at)
    await meters.record(usage(metered, "before", units=50), at)

    def hold(org: str, hold_id: str, units: int, expires_at: datetime, counts: bool) -> Doc:
        doc = {"_id": f"{org}/{hold_id}", "org_id": org, "hold_id": hold_id, "units": units,
               "expires_at": expires_at, "remaining": 0, "created_at": at}
        return {**doc, "until": expires_at} if counts else doc

    later = at + timedelta(seconds=900)
    await db.holds.insert_many([
        hold(metered, "a", 100, later, True), hold(metered, "settled", 7, later, False),
        hold(metered, "expired", 9, at - timedelta(seconds=1), True),
        hold(unmetered, "b", 200, later, True), hold(unmetered, "c", 30, later, True)])
    await db["hold_locks"].insert_many([{"_id": metered, "grants": 3},
                                        {"_id": unmetered, "grants": 2}])
    return metered, unmetered


async def test_active_holds_move_onto_meters_once(
    fresh_db: Database, config: BillingConfig
) -> None:
    """Every hold that still counts moves onto its organization's meter of this week (opened
    when needed) and counts as before; two workers starting together move each once; the
    retired index and collection go, and a later start moves nothing, not even a moved hold
    settled since."""
    db, at = fresh_db, utcnow()
    metered, unmetered = await legacy_holds(db, config, at)
    subscriptions = Subscriptions(db)

    results = await asyncio.gather(migrate(db, subscriptions, config),
                                   migrate(db, subscriptions, config))
    assert sum(r[HOLDS] for r in results) == 3
    meters = Meters(db, config)
    assert (await meters.gate(metered, at)).held == 100
    assert (await meters.gate(unmetered, at)).held == 230
    assert [h.hold_id for h in await active_in(db, unmetered, at)] == ["b", "c"]
    assert "active" not in await db.holds.index_information()
    assert "hold_locks" not in await db.db.list_collection_names()

    assert await release(db, unmetered, "b", at)
    assert (await meters.record(usage(metered, "a", units=60, hold_id="a"), at)).applied
    assert await migrate(db, subscriptions, config) == changed()
    # a start that stopped after moving the holds, before dropping the index: nothing comes back
    await db.holds.create_indexes([IndexModel([("org_id", ASCENDING), ("until", ASCENDING)],
                                              name="active")])
    assert await migrate(db, subscriptions, config) == changed()
    assert "active" not in await db.holds.index_information()
    assert (await meters.gate(metered, at)).held == 0
    assert (await meters.gate(unmetered, at)).held == 30
    assert (await meters.current(metered, at)).used == 110


async def lots_as_an_older_release_kept_them(db: Database, org: str) -> dict[str, int]:
    """Put `org`'s units left back on its lots (`remaining`, the `org_remaining` index, no
    `sweep_at`) and take its open lots off its account; returns what each lot had left."""
    account = await db.accounts.find_one({"_id": org})
    assert account is not None
    left = {lot["id"]: lot["remaining"] for lot in account["lots"]}
    async for lot in db.lots.find({"org_id": org}):
        await db.lots.update_one({"_id": lot["_id"]},
                                 {"$set": {"remaining": left.get(lot["_id"], 0)},
                                  "$unset": {SWEEP_AT: ""}})
    await db.accounts.update_one({"_id": org}, {"$unset": {"lots": ""}})
    await db.lots.create_indexes([IndexModel([("org_id", ASCENDING), ("remaining", ASCENDING)],
                                             name=LEGACY_LOTS_REMAINING)])
    return left


async def test_open_lots_move_onto_accounts_once(
    fresh_db: Database, config: BillingConfig, now: datetime
) -> None:
    """A database of the release that kept a lot's units left on the lot: two workers starting
    together put each organization's open lots on its account once, the expiring ones are
    marked for the sweep, and the books are what they were; a used-up lot stays off."""
    db = fresh_db
    ledger = Ledger(db)
    orgs = [f"org-mig-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for org in orgs:
        await Accounts(db, config).register(org, now)  # a signup grant of 500, no expiry
        await ledger.write(org, key="payment:pi_1", kind=EntryKind.TOPUP, amount=1000, now=now,
                           terms=LotTerms(expires_at=now + timedelta(days=30)))
        await ledger.write(org, key="payment:pi_2", kind=EntryKind.TOPUP, amount=300, now=now,
                           terms=LotTerms(expires_at=now - timedelta(days=1)))
        await ledger.write(org, key="usage:r:1", kind=EntryKind.DEBIT, amount=-1200, now=now)
    before = {org: await lots_as_an_older_release_kept_them(db, org) for org in orgs}
    assert all(len(left) == 2 for left in before.values())  # the first pack ran out
    with pytest.raises(RuntimeError, match="no open lots field"):  # never read as none
        await ledger.write(orgs[0], key="usage:r:early", kind=EntryKind.DEBIT, amount=-1, now=now)

    results = await asyncio.gather(migrate(db, Subscriptions(db), config),
                                   migrate(db, Subscriptions(db), config))
    assert sum(r[LOTS] for r in results) == len(orgs)
    assert LEGACY_LOTS_REMAINING not in await db.lots.index_information()
    for org in orgs:
        lots = {lot["_id"]: lot for lot in await ledger.lots(org, open_only=False)}
        assert {lot_id: lot["remaining"] for lot_id, lot in lots.items() if lot["remaining"]} \
            == before[org]
        assert sorted((lot["units"], lot["remaining"]) for lot in lots.values()) == [
            (300, 300), (500, 300), (1000, 0)]
        assert await db.lots.count_documents({"org_id": org, "remaining": {"$exists": True}}) == 0
        assert {lot_id for lot_id, lot in lots.items() if lot.get(SWEEP_AT)} == {
            lot_id for lot_id, lot in lots.items() if lot["expires_at"] and lot["remaining"]}
        await assert_consistent(db, org)
    assert await migrate(db, Subscriptions(db), config) == changed()

    org = orgs[0]  # the expired lot is swept, the other pays the next debit
    assert await ledger.orgs_with_expired_lots(now, None, 10) == sorted(orgs)
    [expired] = await ledger.expired_lots(org, now)
    assert (await ledger.expire(org, expired, now)).amount == -300
    debit = await ledger.write(org, key="usage:r:2", kind=EntryKind.DEBIT, amount=-100, now=now)
    assert debit.balance == 500 + 1000 + 300 - 1200 - 300 - 100
    assert org not in await ledger.orgs_with_expired_lots(now, None, 10)
    await assert_consistent(db, org)
