"""The MongoDB connection, its collections and their indexes."""

from __future__ import annotations

import contextlib
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure

from billing.store import outbox
from billing.store.durability import DURABLE, check_durable

Doc = dict[str, Any]

#: MongoDB's error code for a write that a unique index refuses.
DUPLICATE_KEY = 11000

LOT_PAYMENTS = "lot_payments"
#: The field of a lot's record that the expiry sweep finds it by: its expiry, until the sweep
#: has looked at it. Unset then, so a sweep reads only the lots it has to expire.
SWEEP_AT = "sweep_at"
#: The index of `lots` by units left of an earlier release, which kept them on the lot: its
#: presence tells the start-up migration that open lots may still have to move to accounts.
LEGACY_LOTS_REMAINING = "org_remaining"
#: Indexes `lots` had before `lot_payments` took them over; the start-up migration drops them
#: once it has copied every purchased lot there (`billing.store.migrations`).
LOTS_PAYMENT_INDEXES = ["payment_intent", "one_lot_per_purchase_line", "charge"]

INDEXES: dict[str, list[IndexModel]] = {
    # Read by `_id` only (an organization's Stripe customer is on its `subscriptions` document).
    "accounts": [],
    "ledger": [
        IndexModel([("org_id", ASCENDING), ("key", ASCENDING)], unique=True, name="org_key"),
        IndexModel([("org_id", ASCENDING), ("seq", DESCENDING)], name="org_seq"),
    ],
    # A lot's record: what it was bought with and its clawbacks (its units left are on its
    # account). The lookups by what Stripe names (payment intent, charge) live in
    # `lot_payments`, written once with the lot and never updated. `sweep_at`: the expiry
    # sweep's lots (by organization, and all of them up to a moment).
    "lots": [
        IndexModel([("org_id", ASCENDING), (SWEEP_AT, ASCENDING)], name="org_sweep"),
        IndexModel([(SWEEP_AT, ASCENDING)], name="sweep"),
    ],
    # One document per purchased lot (`billing.store.documents.lot_payment`), `_id` its lot's.
    LOT_PAYMENTS: [
        IndexModel([("payment_intent", ASCENDING)], name="payment_intent"),
        # One payment intent buys one lot per pack line, whichever organization two racing
        # events name.
        IndexModel([("payment_intent", ASCENDING), ("line", ASCENDING)],
                   name="one_lot_per_purchase_line", unique=True, partialFilterExpression={
                       "kind": "topup", "payment_intent": {"$type": "string"}}),
        IndexModel([("charge", ASCENDING)], name="charge"),
    ],
    "meters": [
        IndexModel([("org_id", ASCENDING), ("week", ASCENDING)], unique=True, name="org_week"),
    ],
    # A usage record's `_id` is its idempotency key (`billing.store.meters.usage_id`): no
    # secondary index. Databases created before keep `LEGACY_USAGE_KEY` (RUNBOOKS). A week's
    # overflow is counted on its meter.
    "usage": [],
    # The record of each balance hold granted, read by `_id` only: the holds that count are
    # kept on the meters (`billing.store.holds`).
    "holds": [],
    "subscriptions": [
        IndexModel([("stripe_customer_id", ASCENDING)], name="stripe_customer"),
        IndexModel([("stripe_subscription_id", ASCENDING)], name="stripe_subscription"),
    ],
    "stripe_subscriptions": [
        IndexModel([("org_id", ASCENDING)], name="org"),
        IndexModel([("status", ASCENDING), ("past_due_since", ASCENDING), ("org_id", ASCENDING)],
                   name="dunning"),
    ],
    "notifications": [
        IndexModel([("org_id", ASCENDING), ("key", ASCENDING)], unique=True, name="org_key"),
        # The feed: gapless per organization, unique so that no two share a place. Partial on
        # `seq >= 0`, which the feed's `seq > after` (after >= 0) provably falls inside, so
        # MongoDB uses it; notifications not numbered yet (see migrations) stay out of it.
        IndexModel([("org_id", ASCENDING), ("seq", ASCENDING)], unique=True, name="feed",
                   partialFilterExpression={"seq": {"$gte": 0}}),
        # Notifications whose outbound deliveries are not started yet, and those a receiver
        # has not acknowledged yet (SPEC §5.7).
        outbox.INDEX,
        IndexModel([("undelivered_since", ASCENDING)], name="undelivered",
                   partialFilterExpression={"undelivered_since": {"$type": "date"}}),
    ],
    "stripe_events": [
        IndexModel([("org_id", ASCENDING)], name="org"),
        IndexModel([("created", ASCENDING)], name="created"),
        IndexModel([("outcome", ASCENDING), ("recorded_at", DESCENDING)], name="unresolved",
                   partialFilterExpression={"outcome": "unresolved"}),
    ],
    "reports": [IndexModel([("created_at", DESCENDING)], name="time")],
    "auto_topups": [
        outbox.INDEX,  # the triggers whose workflow may not be started yet
        IndexModel([("payment_intent", ASCENDING)], name="payment_intent"),
    ],
    # Issued customer tokens and their revocations, read by `_id`; gone once expired (TTL).
    "customer_tokens": [
        IndexModel([("expires_at", ASCENDING)], name="expiry", expireAfterSeconds=0),
    ],
    # Checkout records (SPEC §5.9) are read by `_id` only.
    "checkouts": [],
}


#: The unique `(org_id, run_id, step)` index of usage records written before their key became
#: their `_id`. Never created any more and not dropped at start: while it exists it also
#: recognises replays of those older records (`Meters`); the operator drops it (RUNBOOKS).
LEGACY_USAGE_KEY = "org_run_step"

#: Indexes of earlier releases that a newer one replaced; dropped at start.
RETIRED_INDEXES = {"lots": ["one_purchase_per_payment_intent",
                            # The sweep finds a lot by `sweep_at`, unset once swept.
                            "expires_at"],
                   # No query reads entries by kind and time (the reconciliation pages by
                   # `seq`), and every ledger insert paid for it.
                   "ledger": ["org_kind_time"],
                   # Accounts stopped carrying the Stripe customer; the account is written by
                   # every change of money, and each index costs that write.
                   "accounts": ["stripe_customer"],
                   "subscriptions": ["dunning"], "notifications": ["org_time", "org_seq"],
                   # No query asks for meters by week alone, and on the embedded server every
                   # index costs each meter increment a write.
                   "meters": ["week"],
                   # The reconciliation reads a week's overflow from its meter.
                   "usage": ["org_week"]}


class Database:
    """One client and the engine's collections. Create once per process and share it.

    Every collection writes with `DURABLE` (`billing.store.durability`); `check_durable()` refuses
    a server that cannot honour it."""

    def __init__(self, uri: str, name: str, **client_options: Any) -> None:
        self.client: AsyncMongoClient[Doc] = AsyncMongoClient(
            uri, tz_aware=True, connect=False, **client_options
        )
        self.db: AsyncDatabase[Doc] = self.client.get_database(name, write_concern=DURABLE)
        self._collections: dict[str, AsyncCollection[Doc]] = {}

    def __getitem__(self, name: str) -> AsyncCollection[Doc]:
        """The collection `name`, built once: PyMongo takes about 6 µs to build one, and a
        usage record asks for four."""
        collection = self._collections.get(name)
        if collection is None:
            collection = self._collections[name] = self.db[name]
        return collection

    @property
    def accounts(self) -> AsyncCollection[Doc]:
        return self["accounts"]

    @property
    def ledger(self) -> AsyncCollection[Doc]:
        return self["ledger"]

    @property
    def lots(self) -> AsyncCollection[Doc]:
        return self["lots"]

    @property
    def lot_payments(self) -> AsyncCollection[Doc]:
        return self[LOT_PAYMENTS]

    @property
    def meters(self) -> AsyncCollection[Doc]:
        return self["meters"]

    @property
    def usage(self) -> AsyncCollection[Doc]:
        return self["usage"]

    @property
    def holds(self) -> AsyncCollection[Doc]:
        return self["holds"]

    @property
    def subscriptions(self) -> AsyncCollection[Doc]:
        return self["subscriptions"]

    @property
    def stripe_subscriptions(self) -> AsyncCollection[Doc]:
        return self["stripe_subscriptions"]

    @property
    def notifications(self) -> AsyncCollection[Doc]:
        return self["notifications"]

    @property
    def stripe_events(self) -> AsyncCollection[Doc]:
        return self["stripe_events"]

    @property
    def reports(self) -> AsyncCollection[Doc]:
        return self["reports"]

    @property
    def checkouts(self) -> AsyncCollection[Doc]:
        return self["checkouts"]

    async def ensure_indexes(self) -> None:
        """Create every collection and index; safe to run at every start."""
        existing = set(await self.db.list_collection_names())
        for name, indexes in INDEXES.items():
            if name not in existing:
                with contextlib.suppress(CollectionInvalid):  # another process was first
                    await self.db.create_collection(name)
            for retired in RETIRED_INDEXES.get(name, []):
                with contextlib.suppress(OperationFailure):  # already gone
                    await self.db[name].drop_index(retired)
            if indexes:
                await self.db[name].create_indexes(indexes)

    async def check_durable(self) -> None:
        await check_durable(self.client.admin)

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def close(self) -> None:
        await self.client.close()
