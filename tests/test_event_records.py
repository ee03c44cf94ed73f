"""The `stripe_events` record of an event's first delivery is inserted without a lookup; when
one exists, the whole transaction is aborted, so nothing of the work before it is kept."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession

from billing.models import StripeEvent, StripeEventOutcome, StripeOutcomeKind
from billing.store import events
from billing.store.database import Database
from billing.store.transactions import run_in_transaction


def an_event() -> StripeEvent:
    return StripeEvent(id=f"evt_{uuid.uuid4().hex[:20]}", type="payment_intent.succeeded",
                       created=1_780_000_000, object={"id": "pi_1"})


async def record_first(db: Database, event: StripeEvent, outcome: StripeOutcomeKind,
                       now: datetime, run_id: str) -> None:
    async def work(session: AsyncClientSession) -> None:
        await events.record_in(
            db, session, event, StripeEventOutcome(event_id=event.id, type=event.type,
                                                   outcome=outcome),
            now, run_id, first=True)

    await run_in_transaction(db.client, work)


async def test_a_first_record_is_inserted_and_a_second_is_refused(db: Database,
                                                                   now: datetime) -> None:
    event = an_event()
    await record_first(db, event, "applied", now, "run-1")
    with pytest.raises(events.AlreadyRecorded):
        await record_first(db, event, "ignored", now, "run-2")
    found = await db.stripe_events.find_one({"_id": event.id})
    assert found is not None
    assert (found["outcome"], found["run_id"]) == ("applied", "run-1")


async def test_work_before_a_refused_record_is_not_kept(db: Database, now: datetime) -> None:
    event = an_event()
    scratch = db.stripe_events.database["scratch"]

    async def work(session: AsyncClientSession) -> None:
        await scratch.insert_one({"_id": event.id}, session=session)
        await events.record_in(
            db, session, event, StripeEventOutcome(event_id=event.id, type=event.type,
                                                   outcome="applied"),
            now, "run-2", first=True)

    await record_first(db, event, "applied", now, "run-1")
    with pytest.raises(events.AlreadyRecorded):
        await run_in_transaction(db.client, work)
    assert await scratch.find_one({"_id": event.id}) is None
    found = await db.stripe_events.find_one({"_id": event.id})
    assert found is not None and found["run_id"] == "run-1"
