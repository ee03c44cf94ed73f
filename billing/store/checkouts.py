"""Checkout records (SPEC §5.9), collection `checkouts`, `_id` = the record's `co_...` id:
`org_id`, `request` (what the app asked for, `billing.checkout.CheckoutRequest`), `customer`,
`created_at`, and once Stripe answered, `session_id`, `url`, `expires_at`.

A record is written before its Checkout Session is created, so the session's events always find
it; the session's fields are added after. A record without them is an attempt that died between
the two writes: a retry with the same key completes it.
"""

from __future__ import annotations

from datetime import datetime

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from billing.checkout import CheckoutRequest
from billing.store.database import Database, Doc


class Checkouts:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, checkout_id: str,
                  session: AsyncClientSession | None = None) -> Doc | None:
        return await self.db.checkouts.find_one({"_id": checkout_id}, session=session)

    async def open(self, checkout_id: str, request: CheckoutRequest, customer: str,
                   now: datetime) -> Doc:
        """Write the record, or answer the one a concurrent attempt with the same key wrote."""
        doc: Doc = {"_id": checkout_id, "org_id": request.org_id, "request": request.to_doc(),
                    "customer": customer, "created_at": now}
        try:
            await self.db.checkouts.insert_one(doc)
        except DuplicateKeyError:
            found = await self.get(checkout_id)
            assert found is not None
            return found
        return doc

    async def attach_session(self, checkout_id: str, *, session_id: str, url: str,
                             expires_at: datetime) -> None:
        """Keep the session Stripe made for the record (the same one on every retry: its
        idempotency key is the record's)."""
        await self.db.checkouts.update_one(
            {"_id": checkout_id},
            {"$set": {"session_id": session_id, "url": url, "expires_at": expires_at}})
