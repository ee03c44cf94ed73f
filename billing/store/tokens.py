"""The customer tokens the engine issued, and their revocations (SPEC §5.10).

One document per token, `_id` = its `jti`, written before the token is handed out. Every request
made with a customer token reads its document by `_id` (no per-process cache), so a revocation
made through one API process is refused by every other one from the next request on. A TTL index
removes a document once its token has expired, and with it any revocation, which is then no
longer needed.
"""

from __future__ import annotations

from datetime import datetime

from billing.errors import NotFound
from billing.store.database import Database
from billing.tokens import CustomerToken, TokenInvalid


class TokenNotFound(NotFound):
    code = "TOKEN_NOT_FOUND"


class CustomerTokens:
    def __init__(self, db: Database) -> None:
        self.collection = db["customer_tokens"]

    async def record(self, token: CustomerToken, now: datetime) -> None:
        await self.collection.insert_one({
            "_id": token.token_id, "org_id": token.org_id, "scopes": sorted(token.scopes),
            "expires_at": token.expires_at, "created_at": now, "revoked_at": None,
        })

    async def revoke(self, token_id: str, now: datetime) -> datetime:
        """Revoke a token (again: no change); when it was revoked. `TokenNotFound` for a token
        never issued or already expired."""
        await self.collection.update_one({"_id": token_id, "revoked_at": None},
                                         {"$set": {"revoked_at": now}})
        doc = await self.collection.find_one({"_id": token_id}, {"revoked_at": 1})
        if doc is None:
            raise TokenNotFound(f"no unexpired customer token {token_id!r}")
        revoked_at: datetime = doc["revoked_at"]
        return revoked_at

    async def check_live(self, token: CustomerToken) -> None:
        """Raise `TokenInvalid` unless the engine issued this token and has not revoked it."""
        doc = await self.collection.find_one({"_id": token.token_id},
                                             {"org_id": 1, "revoked_at": 1})
        if doc is None or doc.get("org_id") != token.org_id:
            raise TokenInvalid("customer token is not one this engine issued")
        if doc.get("revoked_at") is not None:
            raise TokenInvalid("customer token was revoked")
