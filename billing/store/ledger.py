"""The credit ledger on MongoDB (SPEC §5.1): every change is one transaction.

Each change runs inside `run_in_transaction` (methods ending in `_in` take the caller's session,
so another unit of work, a Stripe event say, can put a ledger change in its own transaction):

1. look the idempotency key up: an existing `(org_id, key)` entry means `applied: false`
   (skipped when the caller knows the key is unused; the unique index still holds);
2. load the account and what the change reads into the write engine (`billing.store.books`);
3. plan the change there with the pure rules of `billing.ledger`;
4. flush: the new lot, the entry and the account's balance, debt and open lots are written
   together, and the account's write is what serializes changes of one organization.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.errors import InvalidInput, NotFound
from billing.ledger import (
    ClawShare,
    EntryKind,
    OpenLot,
    clawback_units,
    plan_purchase_clawback,
    reinstated_units,
)
from billing.store.books import Books, LedgerResult
from billing.store.database import SWEEP_AT, Database, Doc
from billing.store.documents import (
    Clawed,
    LotTerms,
    PurchasedLot,
    clawback_recorded,
    open_lots,
    units_left,
)
from billing.store.transactions import run_in_transaction


class Ledger:
    """Writes and reads of one organization's entries and lots."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def existing_in(self, session: AsyncClientSession, org_id: str, key: str) -> Doc | None:
        return await self.db.ledger.find_one({"org_id": org_id, "key": key}, session=session)

    async def _unapplied(self, session: AsyncClientSession, existing: Doc) -> LedgerResult:
        account = await self.db.accounts.find_one({"_id": existing["org_id"]}, session=session)
        return LedgerResult(False, existing, int(account["balance"]) if account else 0)

    async def _books(self, session: AsyncClientSession, org_id: str,
                     opening: Doc | None = None) -> Books:
        books = Books(self.db, session)
        await books.load([org_id], opening=opening)
        books.account(org_id)  # an unknown organization is refused before anything is planned
        return books

    async def write_in(
        self,
        session: AsyncClientSession,
        org_id: str,
        *,
        key: str,
        kind: EntryKind,
        amount: int,
        now: datetime,
        memo: str = "",
        terms: LotTerms | None = None,
        meta: dict[str, Any] | None = None,
        opening: Doc | None = None,
        unused_key: bool = False,
    ) -> LedgerResult:
        """Idempotent entry of a known amount (credit, debit, grant, admin, settlement).

        `unused_key`: the caller knows no entry has `key` (a purchase whose payment intent
        `paid_for_in` finds nothing for), so the lookup is skipped: a key that is used after all
        raises `DuplicateKeyError` from the unique `(org_id, key)` index instead of answering
        `applied: false`. `opening`: the account to open (a new account document) when the
        organization has none, written with the entry."""
        if not unused_key:
            existing = await self.existing_in(session, org_id, key)
            if existing is not None:
                return await self._unapplied(session, existing)
        books = await self._books(session, org_id, opening)
        posted = books.post(org_id, key=key, kind=kind, amount=amount, now=now, memo=memo,
                            terms=terms, meta=meta)
        await books.flush(now)
        return posted

    # ---- operations, each in its own transaction -----------------------------------------------

    async def write(
        self,
        org_id: str,
        *,
        key: str,
        kind: EntryKind,
        amount: int,
        now: datetime,
        memo: str = "",
        terms: LotTerms | None = None,
        meta: dict[str, Any] | None = None,
    ) -> LedgerResult:
        async def work(session: AsyncClientSession) -> LedgerResult:
            return await self.write_in(
                session, org_id, key=key, kind=kind, amount=amount, now=now, memo=memo,
                terms=terms, meta=meta,
            )

        return await run_in_transaction(self.db.client, work)

    async def clawback_in(
        self,
        session: AsyncClientSession,
        org_id: str,
        *,
        key: str,
        kind: EntryKind,
        lot_ids: list[str],
        cents: int,
        now: datetime,
        memo: str = "",
        meta: dict[str, Any] | None = None,
        scope: str | None = None,
    ) -> LedgerResult:
        """Refund or dispute of `cents` against the lots bought with the charge (one per pack
        line of the purchase), as planned by `billing.ledger.plan_purchase_clawback`.

        It is spread pro rata over what the charge paid for everything it bought (the lots'
        `paid_cents`, recorded at the purchase); `scope` is the refund's `billing_scope`:
        `packs` spreads it over the pack lines only, `other` takes nothing (recorded, so that
        its reversal gives nothing back either).

        Rounding is cumulative (`billing.ledger.clawback_units`). Each lot keeps each clawback
        `{key, cents, scope, units, usage}`, and the cents standing per scope, so the cumulative
        total is exact even when a clawback rounds to zero units and writes no entry. A key
        already there (applied, or voided by a reversal that came first) is a no-op.
        """
        if kind not in (EntryKind.REFUND, EntryKind.DISPUTE):
            raise ValueError("a clawback is a refund or a dispute")
        if cents <= 0:
            raise InvalidInput("a refunded or disputed amount is a positive number of cents")
        existing = await self.existing_in(session, org_id, key)
        if existing is not None:
            return await self._unapplied(session, existing)
        books = await self._books(session, org_id)
        balance = books.account(org_id).balance
        lots = await self._purchase_lots_in(session, org_id, lot_ids)
        if clawback_recorded(lots, key):
            return LedgerResult(False, None, balance)
        shares = _claw_shares(lots, books.lots(org_id), cents, scope)
        total = sum(share.units for share in shares)
        plan = plan_purchase_clawback(shares, books.lots(org_id), now) if total else None
        returned = dict(plan.usage_returned) if plan else {}
        for lot, share in zip(lots, shares, strict=True):
            books.update_lot(lot.id, lot.keep(Clawed(key=key, cents=cents, scope=scope,
                                                      units=share.units,
                                                      usage=returned.get(lot.id, 0))))
        result = LedgerResult(False, None, balance, {"clawed_units": 0})
        if plan is not None:
            result = books.post(org_id, key=key, kind=kind, amount=-total, now=now,
                                      memo=memo, claw=plan, lot_id=lots[0].id,
                                      meta={**(meta or {}), "cents": cents})
        await books.flush(now)
        return result

    async def _purchase_lots_in(
        self, session: AsyncClientSession, org_id: str, lot_ids: list[str]
    ) -> list[PurchasedLot]:
        cursor = self.db.lots.find({"_id": {"$in": lot_ids}, "org_id": org_id}, session=session)
        lots = sorted([PurchasedLot.from_doc(doc) async for doc in cursor],
                      key=lambda lot: lot.seq)
        if not lots or len(lots) != len(set(lot_ids)) or not all(
                lot.price_cents for lot in lots):
            raise NotFound(f"no purchased lots {lot_ids!r} for organization {org_id!r}")
        return lots

    async def reinstate_in(
        self,
        session: AsyncClientSession,
        org_id: str,
        *,
        key: str,
        withdrawn_key: str,
        lot_ids: list[str],
        now: datetime,
        memo: str = "",
    ) -> LedgerResult:
        """Undo the clawback `withdrawn_key` (a won dispute, a failed or canceled refund): the
        lots' cumulative clawback forgets its cents, and each lot gets back what it lost beyond
        what the refunds and disputes still standing say (`billing.ledger.reinstated_units`:
        after a cap, less than the clawback took).

        The units come back as a new `reinstatement` lot with the first purchased lot's expiry.
        When the clawback has not
        happened yet (Stripe delivered the reversal first), it is voided instead: it will never
        apply, and the reversal writes no entry (`notes["voided"]`).
        """
        existing = await self.existing_in(session, org_id, key)
        if existing is not None:
            return await self._unapplied(session, existing)
        books = await self._books(session, org_id)
        balance = books.account(org_id).balance
        lots = await self._purchase_lots_in(session, org_id, lot_ids)
        if clawback_recorded(lots, key):
            return LedgerResult(False, None, balance)
        if not clawback_recorded(lots, withdrawn_key):
            for lot in lots:
                for clawed in (Clawed(key=withdrawn_key, cents=0, scope=None, units=0, usage=0,
                                      voided_by=key),
                               Clawed(key=key, cents=0, scope=None, units=0, usage=0)):
                    books.update_lot(lot.id, lot.keep(clawed))
            await books.flush(now)
            return LedgerResult(False, None, balance, {"voided": True})
        total = self._give_back(books, lots, key, withdrawn_key)
        result = LedgerResult(False, None, balance, {"reinstated_units": 0})
        if total:
            first = lots[0]
            result = books.post(
                org_id, key=key, kind=EntryKind.REINSTATEMENT, amount=total, now=now, memo=memo,
                terms=LotTerms(expires_at=first.expires_at, source_lot=first.id,
                               charge=first.charge, payment_intent=first.payment_intent),
                meta={"withdrawn_key": withdrawn_key},
            )
        await books.flush(now)
        return result

    @staticmethod
    def _give_back(books: Books, lots: list[PurchasedLot], key: str, withdrawn_key: str) -> int:
        """Each lot forgets the withdrawn clawback's cents and gets back what it lost beyond
        what the clawbacks still standing say; the units given back in all."""
        total = 0
        price = sum(lot.price_cents for lot in lots)
        for lot in lots:
            taken = lot.clawed(withdrawn_key)
            assert taken is not None
            standing, standing_packs = lot.standing_after(taken.scope, -taken.cents)
            units = reinstated_units(
                lot_units=lot.units, lot_price_cents=price, paid_cents=lot.paid_cents,
                standing_cents_total=standing, standing_pack_cents=standing_packs,
                clawed_units=lot.clawed_units)
            usage = min(taken.usage, units)
            total += units
            books.update_lot(lot.id, lot.keep(Clawed(key=key, cents=-taken.cents,
                                                      scope=taken.scope, units=-units,
                                                      usage=-usage)))
        return total

    async def expire(self, org_id: str, lot_id: str, now: datetime) -> LedgerResult:
        """Remove what is left of an expired lot (`expire:<lot id>`), and mark the lot swept
        (its `sweep_at` unset) in the same transaction.

        A used-up lot expires silently: zero-amount entries are never written."""

        async def work(session: AsyncClientSession) -> LedgerResult:
            key = f"expire:{lot_id}"
            existing = await self.existing_in(session, org_id, key)
            if existing is not None:
                return await self._unapplied(session, existing)
            books = await self._books(session, org_id)
            lot = await self.db.lots.find_one({"_id": lot_id, "org_id": org_id},
                                              {"expires_at": 1}, session=session)
            if lot is None:
                raise NotFound(f"no lot {lot_id!r} for organization {org_id!r}")
            expires_at = lot.get("expires_at")
            result = LedgerResult(False, None, books.account(org_id).balance)
            if expires_at is None or expires_at > now:
                return result
            left = units_left(books.lots(org_id)).get(lot_id, 0)
            if left > 0:
                result = books.post(org_id, key=key, kind=EntryKind.EXPIRATION, amount=-left,
                                    now=now, memo="credit lot expired", lot_id=lot_id)
            books.update_lot(lot_id, {"$unset": {SWEEP_AT: ""}})
            await books.flush(now)
            return result

        return await run_in_transaction(self.db.client, work)

    # ---- reads ----------------------------------------------------------------------------------

    async def orgs_with_expired_lots(self, now: datetime, after: str | None,
                                     limit: int) -> list[str]:
        """Organizations with an expired lot the sweep has not looked at yet, in id order (the
        daily expiry sweep, by organization)."""
        query: Doc = {SWEEP_AT: {"$lte": now}}
        if after is not None:
            query["org_id"] = {"$gt": after}
        found: list[str] = []
        cursor = self.db.lots.find(query, {"org_id": 1}).sort("org_id", 1)
        async for doc in cursor:
            if not found or found[-1] != doc["org_id"]:
                found.append(str(doc["org_id"]))
                if len(found) == limit:
                    break
        return found

    async def expired_lots(self, org_id: str, now: datetime) -> list[str]:
        """The ids of the organization's lots expired at `now` that the sweep has not looked at
        yet."""
        cursor = self.db.lots.find({"org_id": org_id, SWEEP_AT: {"$lte": now}}, {"_id": 1})
        return [doc["_id"] async for doc in cursor]

    async def lots(self, org_id: str, *, open_only: bool = True) -> list[Doc]:
        """The organization's lots (only those with units left by default), oldest first, each
        with its `remaining` (kept on the account: 0 for a lot that ran out), read together in
        one snapshot."""

        async def read(session: AsyncClientSession) -> list[Doc]:
            account = await self.db.accounts.find_one({"_id": org_id}, {"lots": 1},
                                                       session=session)
            if account is None:
                return []
            left = units_left(open_lots(account))
            query: Doc = {"org_id": org_id}
            if open_only:
                query = {"_id": {"$in": sorted(left)}}
            cursor = self.db.lots.find(query, session=session).sort("seq", 1)
            return [{**doc, "remaining": left.get(doc["_id"], 0)} async for doc in cursor]

        return await run_in_transaction(self.db.client, read)

    async def entries(self, org_id: str, *, limit: int, before_seq: int | None = None) -> list[Doc]:
        """Newest first, paged by the account's monotonic `seq`."""
        query: Doc = {"org_id": org_id}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        cursor = self.db.ledger.find(query).sort("seq", -1).limit(limit)
        return [doc async for doc in cursor]

    async def paid_for_in(self, session: AsyncClientSession, payment_intent: str) -> bool:
        """Whether a pack was credited for `payment_intent`, to whichever organization. Every
        `payment:<pi>` entry writes its lot and the lot's `lot_payments` document in the same
        transaction, so when this is False no entry of those keys exists."""
        found = await self.db.lot_payments.find_one(
            {"payment_intent": payment_intent, "kind": EntryKind.TOPUP.value}, {"_id": 1},
            session=session)
        return found is not None

    async def find_purchase_lots(
        self, *, payment_intent: str | None, charge: str | None,
        session: AsyncClientSession | None = None,
    ) -> list[Doc]:
        """The lots bought with a payment intent or charge, one per pack line (what refunds and
        disputes claw back from). Payment intent and charge ids are unique across Stripe, so the
        lots also tell whose purchase it was."""
        for field_name, value in (("payment_intent", payment_intent), ("charge", charge)):
            if not value:
                continue
            cursor = self.db.lot_payments.find(
                {field_name: value, "kind": EntryKind.TOPUP.value, "price_cents": {"$gt": 0}},
                {"_id": 1}, session=session)
            ids = [doc["_id"] async for doc in cursor]
            if ids:
                lots = self.db.lots.find({"_id": {"$in": ids}}, session=session)
                return sorted([doc async for doc in lots], key=lambda lot: lot["seq"])
        return []


def _claw_shares(lots: list[PurchasedLot], open_lots: list[OpenLot], cents: int,
                 scope: str | None) -> list[ClawShare]:
    """What a clawback of `cents` takes from each purchased lot (`clawback_units`: cumulative,
    pro rata over what the charge paid), counted where its scope stands; `open_lots`: the
    account's, which tell what each lot has left."""
    price = sum(lot.price_cents for lot in lots)
    paid = lots[0].paid_cents
    shares = []
    for lot in lots:
        standing, standing_packs = lot.standing_after(scope, cents)
        shares.append(ClawShare(
            lot=lot.open_in(open_lots),
            units=clawback_units(
                lot_units=lot.units, lot_price_cents=price, paid_cents=paid,
                clawed_cents_total=standing, pack_cents_total=standing_packs,
                already_clawed=lot.clawed_units),
            usage_repaid=lot.repaid_usage - lot.usage_returned,
        ))
    return shares
