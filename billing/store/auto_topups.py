"""Automatic top-up on MongoDB (SPEC §5.8): settings and counters on the account, one trigger
document per top-up in `auto_topups`.

A trigger is recorded by the ledger write that lowered the balance (`Books.post`, the write
engine), so it commits or vanishes with that write. Its document
`{_id: auto-topup-<org>-<n>, dispatch: "pending", status: pending, ...}` is an outbox entry
(`billing/store/outbox.py`): the worker's dispatcher starts its workflow and then clears the
mark, so a crash between commit and start only delays it.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection

from billing.auto_topup import (
    AutoTopUp,
    NoPaymentMethod,
    configured,
    failed,
    month_of,
    succeeded,
)
from billing.config import BillingConfig
from billing.errors import InvalidInput, NotFound, OrgNotFound
from billing.store.books import TRIGGERS, notify
from billing.store.database import Database, Doc
from billing.store.subscriptions import linked_customer
from billing.store.transactions import run_in_transaction

SUCCEEDED = "succeeded"
FAILED = "failed"


def triggers(db: Database) -> AsyncCollection[Doc]:
    return db[TRIGGERS]


async def _save_in(db: Database, session: AsyncClientSession, org_id: str,
                   state: AutoTopUp) -> None:
    await db.accounts.update_one({"_id": org_id}, {"$set": {"auto_topup": asdict(state)}},
                                 session=session)


async def _state_in(db: Database, session: AsyncClientSession, org_id: str) -> AutoTopUp:
    account = await db.accounts.find_one({"_id": org_id}, {"auto_topup": 1}, session=session)
    if account is None:
        raise OrgNotFound(org_id)
    return AutoTopUp.from_doc(account.get("auto_topup"))


def view(state: AutoTopUp, now: datetime) -> dict[str, Any]:
    """What `GET /v1/orgs/{org}/auto-topup` answers."""
    return {"enabled": state.enabled, "pack_id": state.pack_id,
            "below_units": state.below_units, "max_per_month": state.max_per_month,
            "paused": state.paused, "this_month": state.count_in(month_of(now))}


class AutoTopUps:
    def __init__(self, db: Database, config: BillingConfig) -> None:
        self.db = db
        self.config = config

    async def get(self, org_id: str) -> AutoTopUp:
        account = await self.db.accounts.find_one({"_id": org_id}, {"auto_topup": 1})
        if account is None:
            raise OrgNotFound(org_id)
        return AutoTopUp.from_doc(account.get("auto_topup"))

    async def configure(self, org_id: str, *, enabled: bool, pack_id: str, below_units: int,
                        max_per_month: int) -> AutoTopUp:
        """Store the settings (`PUT /v1/orgs/{org}/auto-topup`, `billing auto-topup`).

        An unknown pack is `UNKNOWN_PACK` (422); enabling needs a linked Stripe customer
        (`NO_PAYMENT_METHOD`, 409); disabling never does. Enabling unpauses."""
        if pack_id not in self.config.packs_by_id:
            raise InvalidInput(f"unknown pack {pack_id!r}", code="UNKNOWN_PACK")
        if below_units < 0 or max_per_month < 0:
            raise InvalidInput("below_units and max_per_month are >= 0")

        async def work(session: AsyncClientSession) -> AutoTopUp:
            state = await _state_in(self.db, session, org_id)
            if enabled and await self.customer_in(session, org_id) is None:
                raise NoPaymentMethod(
                    f"organization {org_id!r} has no linked Stripe customer to charge")
            new = configured(state, enabled=enabled, pack_id=pack_id, below_units=below_units,
                             max_per_month=max_per_month)
            await _save_in(self.db, session, org_id, new)
            return new

        return await run_in_transaction(self.db.client, work)

    async def customer_in(self, session: AsyncClientSession | None, org_id: str) -> str | None:
        """The organization's linked Stripe customer (the customer link of SPEC §5.5)."""
        return await linked_customer(self.db, org_id, session)

    # ---- the workflow's outcome -----------------------------------------------------------------

    async def find_in(self, session: AsyncClientSession, trigger_id: str) -> Doc:
        found = await triggers(self.db).find_one({"_id": trigger_id}, session=session)
        if found is None:
            raise NotFound(f"no auto top-up {trigger_id!r}")
        return found

    async def succeeded_in(self, session: AsyncClientSession, trigger: Doc, *,
                           payment_intent: str, now: datetime) -> None:
        """Close the top-up as bought: the streak of failures ends."""
        org_id = trigger["org_id"]
        await triggers(self.db).update_one(
            {"_id": trigger["_id"]},
            {"$set": {"status": SUCCEEDED, "payment_intent": payment_intent, "closed_at": now}},
            session=session)
        state = await _state_in(self.db, session, org_id)
        await _save_in(self.db, session, org_id, _closing(state, trigger, succeeded(state)))
        await notify(self.db, session, org_id=org_id, type="auto_topup.succeeded",
                     key=f"auto_topup.succeeded:{trigger['_id']}",
                     payload={"workflow_id": trigger["_id"], "pack_id": trigger["pack_id"],
                              "payment_intent": payment_intent}, now=now)

    async def failed_in(self, session: AsyncClientSession, trigger: Doc, *,
                        payment_intent: str | None, reason: str, now: datetime) -> bool:
        """Close the top-up as failed (`auto_topup.failed`); True when this failure paused auto
        top-up (`auto_topup.paused`)."""
        org_id = trigger["org_id"]
        await triggers(self.db).update_one(
            {"_id": trigger["_id"]},
            {"$set": {"status": FAILED, "payment_intent": payment_intent, "reason": reason,
                      "closed_at": now}},
            session=session)
        state = await _state_in(self.db, session, org_id)
        new = _closing(state, trigger, failed(state, trigger["month"]))
        await _save_in(self.db, session, org_id, new)
        payload = {"workflow_id": trigger["_id"], "pack_id": trigger["pack_id"],
                   "payment_intent": payment_intent, "reason": reason, "failures": new.failures}
        await notify(self.db, session, org_id=org_id, type="auto_topup.failed",
                     key=f"auto_topup.failed:{trigger['_id']}", payload=payload, now=now)
        paused_now = new.paused and not state.paused
        if paused_now:
            await notify(self.db, session, org_id=org_id, type="auto_topup.paused",
                         key=f"auto_topup.paused:{trigger['_id']}", payload=payload, now=now)
        return paused_now

    async def disable_for_payment_in(self, session: AsyncClientSession, *, payment_intent: str,
                                     dispute: str, now: datetime) -> bool:
        """A dispute withdrew the funds of an auto top-up payment: disable auto top-up
        (`auto_topup.disabled`), so a stolen card does not keep buying. False when the payment
        was no auto top-up."""
        trigger = await triggers(self.db).find_one({"payment_intent": payment_intent},
                                                   session=session)
        if trigger is None:
            return False
        org_id = trigger["org_id"]
        state = await _state_in(self.db, session, org_id)
        await _save_in(self.db, session, org_id, replace(state, enabled=False))
        await notify(self.db, session, org_id=org_id, type="auto_topup.disabled",
                     key=f"auto_topup.disabled:{dispute}",
                     payload={"workflow_id": trigger["_id"], "payment_intent": payment_intent,
                              "dispute": dispute}, now=now)
        return True


def _closing(state: AutoTopUp, trigger: Doc, closed: AutoTopUp) -> AutoTopUp:
    """Only the top-up in flight closes it; a late outcome of an older one changes nothing."""
    return closed if state.in_flight == trigger["_id"] else state
