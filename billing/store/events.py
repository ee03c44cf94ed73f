"""What each Stripe event did: one `stripe_events` document per event id.

The record is written in the transaction of the event's change, so it exists exactly when the
change does; `GET /v1/stripe-events/{evt id}` reads it.
"""

from __future__ import annotations

from datetime import datetime

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.models import StripeEvent, StripeEventOutcome
from billing.store.database import Database, Doc


async def recorded_by_in(
    db: Database, session: AsyncClientSession, event_id: str
) -> tuple[StripeEventOutcome, str | None] | None:
    """The recorded outcome of an event and the workflow run that recorded it."""
    doc = await db.stripe_events.find_one({"_id": event_id}, session=session)
    return (outcome_of(doc), doc.get("run_id")) if doc is not None else None


async def record_in(
    db: Database,
    session: AsyncClientSession,
    event: StripeEvent,
    outcome: StripeEventOutcome,
    now: datetime,
    run_id: str | None = None,
) -> None:
    """Record (or, for an event that was `unresolved` and now ran again, overwrite) its outcome."""
    await db.stripe_events.update_one(
        {"_id": event.id},
        {
            "$set": {
                "type": event.type,
                "created": event.created,
                "outcome": outcome.outcome,
                "org_id": outcome.org_id,
                "reason": outcome.reason,
                "written": outcome.written,
                "recorded_at": now,
                "run_id": run_id,
            }
        },
        upsert=True,
        session=session,
    )


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
