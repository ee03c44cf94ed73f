"""What each Stripe event did: one `stripe_events` document per event id.

The record is written in the transaction of the event's change, so it exists exactly when the
change does; `GET /v1/stripe-events/{evt id}` reads it.
"""

from __future__ import annotations

from datetime import datetime

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from billing.models import StripeEvent, StripeEventOutcome
from billing.store.database import Database, Doc


async def recorded_by_in(
    db: Database, session: AsyncClientSession, event_id: str
) -> tuple[StripeEventOutcome, str | None] | None:
    """The recorded outcome of an event and the workflow run that recorded it."""
    doc = await db.stripe_events.find_one({"_id": event_id}, session=session)
    return (outcome_of(doc), doc.get("run_id")) if doc is not None else None


class AlreadyRecorded(Exception):
    """`record_in(first=True)` found the event recorded: its transaction must be aborted and the
    event decided again knowing its record (`recorded_by_in`)."""


async def record_in(
    db: Database,
    session: AsyncClientSession,
    event: StripeEvent,
    outcome: StripeEventOutcome,
    now: datetime,
    run_id: str | None = None,
    *,
    first: bool = False,
) -> None:
    """Record (or, for an event that was `unresolved` and now ran again, overwrite) its outcome.

    `first`: the caller did not look the record up (an event's first delivery, by far the
    commonest, saves that command): insert it, and raise `AlreadyRecorded` when it exists."""
    fields = {
        "type": event.type,
        "created": event.created,
        "outcome": outcome.outcome,
        "org_id": outcome.org_id,
        "reason": outcome.reason,
        "written": outcome.written,
        "recorded_at": now,
        "run_id": run_id,
    }
    if first:
        try:
            await db.stripe_events.insert_one({"_id": event.id, **fields}, session=session)
        except DuplicateKeyError as exc:
            raise AlreadyRecorded(event.id) from exc
        return
    await db.stripe_events.update_one(
        {"_id": event.id}, {"$set": fields}, upsert=True, session=session)


async def get(db: Database, event_id: str) -> Doc | None:
    return await db.stripe_events.find_one({"_id": event_id})


def outcome_of(doc: Doc) -> StripeEventOutcome:
    return StripeEventOutcome(
        event_id=doc["_id"],
        type=doc["type"],
        outcome=doc["outcome"],
        org_id=doc.get("org_id"),
        reason=doc.get("reason"),
        written=list(doc.get("written") or []),
    )
