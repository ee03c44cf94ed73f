"""The credit ledger on MongoDB (SPEC §5.1): every change is one transaction.

Each write follows the same steps inside `run_in_transaction`:

1. look the idempotency key up: an existing `(org_id, key)` entry means `applied: false`
   (skipped when the caller knows the key is unused; the unique index still holds);
2. lock the account by bumping its `seq` (concurrent writers on one organization now conflict,
   and MongoDB retries the loser with a fresh snapshot), opening it first when asked;
3. plan the change with the pure rules of `billing.ledger`;
4. write the lots, the entry and the account's balance and debt together.

Methods whose name ends in `_in` take the caller's session, so another unit of work (recording
usage, a Stripe event) can put a ledger change in its own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from billing.errors import InvalidInput, NotFound, OrgNotFound
from billing.ledger import (
    Clawback,
    ClawShare,
    Debt,
    Draw,
    EntryKind,
    OpenLot,
    check_sign,
    clawback_units,
    plan_credit,
    plan_draw,
    plan_expiry,
    plan_purchase_clawback,
    reinstated_units,
)
from billing.metrics import LEDGER_ENTRIES
from billing.store.auto_topups import trigger_in
from billing.store.database import Database, Doc
from billing.store.transactions import after_commit, run_in_transaction

#: Where a lot counts the cents of the clawbacks standing against it, by `billing_scope`: none
#: (spread over everything the charge paid for), `packs` (over the pack lines only); `other`
#: takes nothing and counts nowhere.
_SCOPE_FIELDS = {"": "clawback_cents", "packs": "clawback_pack_cents"}


@dataclass(frozen=True)
class LotTerms:
    """What a positive entry records on the lot it opens."""

    expires_at: datetime | None = None
    payment_intent: str | None = None
    charge: str | None = None
    checkout_session: str | None = None
    pack_id: str | None = None
    price_cents: int | None = None
    #: What the charge paid for everything it bought (packs and other lines): a refund is spread
    #: over it pro rata (SPEC 5.1). None: only the packs (lots written before it was recorded).
    paid_cents: int | None = None
    line: int | None = None  # the pack line of the purchase (1-based)
    source_lot: str | None = None


@dataclass(frozen=True)
class LedgerResult:
    applied: bool
    entry: Doc | None
    balance: int
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def amount(self) -> int:
        return int(self.entry["amount"]) if self.entry else 0


def _open_lot(doc: Doc) -> OpenLot:
    return OpenLot(id=doc["_id"], remaining=doc["remaining"], expires_at=doc.get("expires_at"),
                   seq=doc["seq"])


async def _open_lots_of(db: Database, session: AsyncClientSession,
                        org_ids: Sequence[str]) -> dict[str, list[OpenLot]]:
    """The open lots (units left) of each organization, as the draw rules take them."""
    lots: dict[str, list[OpenLot]] = {org: [] for org in org_ids}
    async for doc in db.lots.find(
            {"org_id": {"$in": list(org_ids)}, "remaining": {"$gt": 0}},
            {"org_id": 1, "remaining": 1, "expires_at": 1, "seq": 1}, session=session):
        lots[doc["org_id"]].append(_open_lot(doc))
    return lots


def _debt(account: Doc) -> Debt:
    return Debt(usage=int(account.get("usage_debt", 0)), other=int(account.get("other_debt", 0)))


def _entry(org_id: str, seq: int, key: str, kind: EntryKind, amount: int, memo: str,
           now: datetime) -> Doc:
    return {"_id": ObjectId(), "org_id": org_id, "seq": seq, "key": key, "kind": kind.value,
            "amount": amount, "lot_id": None, "memo": memo, "created_at": now}


def _drawn(entry: Doc, draws: Sequence[tuple[str, int]], lot_id: str | None, added: int) -> None:
    """What a negative entry took: its draws, and the debt it added (what no lot covered)."""
    entry["draws"] = [{"lot_id": drawn, "units": units} for drawn, units in draws]
    entry["lot_id"] = lot_id
    if added:
        entry["debt_added"] = added


def _sealed(entry: Doc, balance: int, meta: dict[str, Any] | None) -> None:
    entry["balance_after"] = balance
    if meta:
        entry["meta"] = meta


class Ledger:
    """Writes and reads of one organization's entries and lots."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- the shared steps -------------------------------------------------------------------

    async def existing_in(self, session: AsyncClientSession, org_id: str, key: str) -> Doc | None:
        return await self.db.ledger.find_one({"org_id": org_id, "key": key}, session=session)

    async def lock_in(self, session: AsyncClientSession, org_id: str, *,
                      opening: Doc | None = None) -> Doc:
        """Bump the account's `seq`: the write that serializes every ledger change of one org.
        With `opening` (a new account document), an organization without an account opens
        that one in the same command.

        An update and a read by `_id`, not a findAndModify: the embedded server runs the latter
        as a collection scan, so its cost would grow with the number of organizations."""
        update: Doc = {"$inc": {"seq": 1}}
        if opening is not None:
            update["$setOnInsert"] = {k: v for k, v in opening.items() if k not in ("_id", "seq")}
        locked = await self.db.accounts.update_one(
            {"_id": org_id}, update, upsert=opening is not None, session=session
        )
        if locked.matched_count != 1 and locked.upserted_id is None:
            raise OrgNotFound(org_id)
        account = await self.db.accounts.find_one({"_id": org_id}, session=session)
        assert account is not None
        return account

    async def _unapplied(self, session: AsyncClientSession, existing: Doc) -> LedgerResult:
        account = await self.db.accounts.find_one({"_id": existing["org_id"]}, session=session)
        return LedgerResult(False, existing, int(account["balance"]) if account else 0)

    async def _open_lots(self, session: AsyncClientSession, org_id: str) -> list[OpenLot]:
        return (await _open_lots_of(self.db, session, [org_id]))[org_id]

    async def post_in(
        self,
        session: AsyncClientSession,
        account: Doc,
        *,
        key: str,
        kind: EntryKind,
        amount: int,
        now: datetime,
        memo: str = "",
        terms: LotTerms | None = None,
        claw: Clawback | None = None,
        lot_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> LedgerResult:
        """Write one entry on a locked account (`lock_in` result): lots, debt, balance, entry.

        A negative entry draws as planned by `claw` (a refund or dispute), from its own lot
        `lot_id` (an expiry), or in debit order (a debit or an admin debit)."""
        check_sign(kind, amount)
        org_id = account["_id"]
        entry = _entry(org_id, int(account["seq"]), key, kind, amount, memo, now)
        if amount > 0:
            debt = await self._credit_in(session, account, entry, terms or LotTerms())
        else:
            debt = _debt(account) + await self._draw_in(session, account, entry, claw, lot_id)
        balance = int(account["balance"]) + amount
        _sealed(entry, balance, meta)
        await self.db.ledger.insert_one(entry, session=session)
        after_commit(session, LEDGER_ENTRIES.labels(kind.value).inc)
        await self.db.accounts.update_one(
            {"_id": org_id},
            {
                "$inc": {"balance": amount},
                "$set": {"usage_debt": debt.usage, "other_debt": debt.other, "updated_at": now},
            },
            session=session,
        )
        if amount < 0:
            # Every write that lowers a balance passes here, on the locked account: the one
            # place an automatic top-up is triggered (SPEC §5.8).
            await trigger_in(self.db, session, account, balance_after=balance, now=now)
        return LedgerResult(True, entry, balance)

    async def _credit_in(self, session: AsyncClientSession, account: Doc, entry: Doc,
                         terms: LotTerms) -> Debt:
        """A positive entry repays debt first (`billing.ledger.plan_credit`) and opens a lot of
        what is left; the debt after it."""
        debt = _debt(account)
        kind = EntryKind(entry["kind"])
        repay = plan_credit(debt, entry["amount"], usage_debt_only=kind is EntryKind.SETTLEMENT)
        lot_id = f"lot_{entry['_id']}"
        await self.db.lots.insert_one({
            "_id": lot_id, "org_id": entry["org_id"], "kind": kind.value, "key": entry["key"],
            "seq": entry["seq"], "units": entry["amount"], "remaining": repay.lot_remaining,
            "repaid_debt": repay.other + repay.usage, "repaid_usage": repay.usage,
            "line": terms.line, "expires_at": terms.expires_at,
            "payment_intent": terms.payment_intent, "charge": terms.charge,
            "checkout_session": terms.checkout_session, "pack_id": terms.pack_id,
            "price_cents": terms.price_cents, "paid_cents": terms.paid_cents,
            "source_lot": terms.source_lot, "clawbacks": [], "clawback_cents": 0,
            "clawed_units": 0, "usage_returned": 0, "created_at": entry["created_at"],
        }, session=session)
        entry["lot_id"] = lot_id
        entry["repaid"] = {"other": repay.other, "usage": repay.usage}
        return Debt(usage=debt.usage - repay.usage, other=debt.other - repay.other)

    async def _draw_in(self, session: AsyncClientSession, account: Doc, entry: Doc,
                       claw: Clawback | None, lot_id: str | None) -> Debt:
        """A negative entry takes from the lots as planned by `claw` (a refund or dispute), from
        its own lot `lot_id` (an expiry), or in debit order (a debit or an admin debit); the debt
        it adds (what no lot covered)."""
        kind, units_wanted = EntryKind(entry["kind"]), -int(entry["amount"])
        if claw is not None:
            draws, added = claw.draws, Debt(usage=claw.usage_debt, other=claw.other_debt)
        else:
            if lot_id is not None:
                own = await self.db.lots.find_one({"_id": lot_id}, session=session)
                if own is None:
                    raise NotFound(f"no lot {lot_id!r}")
                planned = plan_expiry(_open_lot(own), units_wanted)
            elif kind in (EntryKind.DEBIT, EntryKind.ADJUSTMENT):
                planned = plan_draw(await self._open_lots(session, account["_id"]),
                                    units_wanted, entry["created_at"])
            else:
                raise ValueError(f"a {kind} entry names the lots it takes from")
            draws = planned.draws
            usage = planned.shortfall if kind is EntryKind.DEBIT else 0
            added = Debt(usage=usage, other=planned.shortfall - usage)
        for drawn_lot, units in draws:
            updated = await self.db.lots.update_one(
                {"_id": drawn_lot, "remaining": {"$gte": units}},
                {"$inc": {"remaining": -units}},
                session=session,
            )
            if updated.matched_count != 1:
                raise RuntimeError(f"lot {drawn_lot} changed under a locked account")
        _drawn(entry, draws, lot_id, added.usage + added.other)
        return added

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
        `applied: false`. `opening`: as for `lock_in`."""
        if not unused_key:
            existing = await self.existing_in(session, org_id, key)
            if existing is not None:
                return await self._unapplied(session, existing)
        account = await self.lock_in(session, org_id, opening=opening)
        return await self.post_in(
            session, account, key=key, kind=kind, amount=amount, now=now, memo=memo,
            terms=terms, meta=meta,
        )

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
        account = await self.lock_in(session, org_id)
        lots = await self._purchase_lots_in(session, org_id, lot_ids)
        if _recorded(lots, key):
            return LedgerResult(False, None, int(account["balance"]))
        counter = _SCOPE_FIELDS.get(scope or "")
        shares = _claw_shares(lots, cents, counter)
        total = sum(share.units for share in shares)
        plan = (plan_purchase_clawback(shares, await self._open_lots(session, org_id), now)
                if total else None)
        await self._record_clawback_in(session, shares, dict(plan.usage_returned) if plan else {},
                                       {"key": key, "cents": cents, "scope": scope}, counter)
        if plan is None:
            return LedgerResult(False, None, int(account["balance"]), {"clawed_units": 0})
        return await self.post_in(
            session, account, key=key, kind=kind, amount=-total, now=now, memo=memo,
            claw=plan, lot_id=lots[0]["_id"], meta={**(meta or {}), "cents": cents},
        )

    async def _record_clawback_in(self, session: AsyncClientSession, shares: list[ClawShare],
                                  returned: dict[str, int], clawback: Doc,
                                  counter: str | None) -> None:
        """Each lot keeps the clawback (`{key, cents, scope, units, usage}`) and counts its
        cents in the scope's `counter`."""
        cents = int(clawback["cents"])
        for share in shares:
            usage = returned.get(share.lot.id, 0)
            counted = {counter: cents} if counter else {}
            await self.db.lots.update_one(
                {"_id": share.lot.id},
                {
                    "$push": {"clawbacks": {**clawback, "units": share.units, "usage": usage}},
                    "$inc": {**counted, "clawed_units": share.units, "usage_returned": usage},
                },
                session=session,
            )

    async def _purchase_lots_in(
        self, session: AsyncClientSession, org_id: str, lot_ids: list[str]
    ) -> list[Doc]:
        cursor = self.db.lots.find({"_id": {"$in": lot_ids}, "org_id": org_id}, session=session)
        lots = sorted([doc async for doc in cursor], key=lambda lot: lot["seq"])
        if not lots or len(lots) != len(set(lot_ids)) or not all(
                lot.get("price_cents") for lot in lots):
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
        account = await self.lock_in(session, org_id)
        balance = int(account["balance"])
        lots = await self._purchase_lots_in(session, org_id, lot_ids)
        if _recorded(lots, key):
            return LedgerResult(False, None, balance)
        if not _recorded(lots, withdrawn_key):
            for lot in lots:
                await self.db.lots.update_one({"_id": lot["_id"]}, {"$push": {"clawbacks": {
                    "$each": [{"key": withdrawn_key, "cents": 0, "units": 0, "usage": 0,
                               "voided_by": key},
                              {"key": key, "cents": 0, "units": 0, "usage": 0}]}}},
                    session=session)
            return LedgerResult(False, None, balance, {"voided": True})
        total = await self._give_back_in(session, lots, key, withdrawn_key)
        if total == 0:
            return LedgerResult(False, None, balance, {"reinstated_units": 0})
        first = lots[0]
        return await self.post_in(
            session, account, key=key, kind=EntryKind.REINSTATEMENT, amount=total,
            now=now, memo=memo,
            terms=LotTerms(expires_at=first.get("expires_at"), source_lot=first["_id"],
                           charge=first.get("charge"), payment_intent=first.get("payment_intent")),
            meta={"withdrawn_key": withdrawn_key},
        )

    async def _give_back_in(self, session: AsyncClientSession, lots: list[Doc], key: str,
                            withdrawn_key: str) -> int:
        """Each lot forgets the withdrawn clawback's cents and gets back what it lost beyond
        what the clawbacks still standing say; the units given back in all."""
        total = 0
        price = sum(int(lot["price_cents"]) for lot in lots)
        for lot in lots:
            taken = next(c for c in lot["clawbacks"] if c["key"] == withdrawn_key)
            counter = _SCOPE_FIELDS.get(taken.get("scope") or "")
            gone = {counter: int(taken["cents"])} if counter else {}
            units = reinstated_units(
                lot_units=lot["units"], lot_price_cents=price, paid_cents=lot.get("paid_cents"),
                standing_cents_total=int(lot["clawback_cents"]) - gone.get("clawback_cents", 0),
                standing_pack_cents=int(lot.get("clawback_pack_cents", 0)) - gone.get(
                    "clawback_pack_cents", 0),
                clawed_units=int(lot["clawed_units"]))
            usage = min(int(taken.get("usage", 0)), units)
            total += units
            await self.db.lots.update_one(
                {"_id": lot["_id"]},
                {
                    "$push": {"clawbacks": {"key": key, "cents": -taken["cents"],
                                            "scope": taken.get("scope"), "units": -units,
                                            "usage": -usage}},
                    "$inc": {**{k: -v for k, v in gone.items()}, "clawed_units": -units,
                             "usage_returned": -usage},
                },
                session=session,
            )
        return total

    async def expire(self, org_id: str, lot_id: str, now: datetime) -> LedgerResult:
        """Remove what is left of an expired lot (`expire:<lot id>`).

        A used-up lot expires silently: zero-amount entries are never written."""

        async def work(session: AsyncClientSession) -> LedgerResult:
            key = f"expire:{lot_id}"
            existing = await self.existing_in(session, org_id, key)
            if existing is not None:
                return await self._unapplied(session, existing)
            account = await self.lock_in(session, org_id)
            lot = await self.db.lots.find_one({"_id": lot_id, "org_id": org_id}, session=session)
            if lot is None:
                raise NotFound(f"no lot {lot_id!r} for organization {org_id!r}")
            expires_at = lot.get("expires_at")
            if expires_at is None or expires_at > now or lot["remaining"] <= 0:
                return LedgerResult(False, None, int(account["balance"]))
            return await self.post_in(
                session, account, key=key, kind=EntryKind.EXPIRATION, amount=-lot["remaining"],
                now=now, memo="credit lot expired", lot_id=lot_id,
            )

        return await run_in_transaction(self.db.client, work)

    # ---- reads ----------------------------------------------------------------------------------

    async def orgs_with_expired_lots(self, now: datetime, after: str | None,
                                     limit: int) -> list[str]:
        """Organizations with an expired lot that still holds units, in id order (the daily
        expiry sweep, by organization)."""
        query: Doc = {"expires_at": {"$lte": now}, "remaining": {"$gt": 0}}
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

    async def lots(self, org_id: str, *, open_only: bool = True) -> list[Doc]:
        query: Doc = {"org_id": org_id}
        if open_only:
            query["remaining"] = {"$gt": 0}
        cursor = self.db.lots.find(query).sort("seq", 1)
        return [doc async for doc in cursor]

    async def entries(self, org_id: str, *, limit: int, before_seq: int | None = None) -> list[Doc]:
        """Newest first, paged by the account's monotonic `seq`."""
        query: Doc = {"org_id": org_id}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        cursor = self.db.ledger.find(query).sort("seq", -1).limit(limit)
        return [doc async for doc in cursor]

    async def paid_for_in(self, session: AsyncClientSession, payment_intent: str) -> bool:
        """Whether a pack was credited for `payment_intent`, to whichever organization. Every
        `payment:<pi>` entry writes its lot with the payment intent in the same transaction, so
        when this is False no entry of those keys exists."""
        found = await self.db.lots.find_one(
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
            cursor = self.db.lots.find(
                {field_name: value, "kind": EntryKind.TOPUP.value, "price_cents": {"$gt": 0}},
                session=session,
            )
            found = sorted([doc async for doc in cursor], key=lambda lot: lot["seq"])
            if found:
                return found
        return []


def _claw_shares(lots: list[Doc], cents: int, counter: str | None) -> list[ClawShare]:
    """What a clawback of `cents` takes from each purchased lot (`clawback_units`: cumulative,
    pro rata over what the charge paid), counted in the lots' `counter` of its scope."""
    price = sum(int(lot["price_cents"]) for lot in lots)
    paid = lots[0].get("paid_cents")
    return [
        ClawShare(
            lot=_open_lot(lot),
            units=clawback_units(
                lot_units=lot["units"], lot_price_cents=price, paid_cents=paid,
                clawed_cents_total=int(lot["clawback_cents"]) + (
                    cents if counter == "clawback_cents" else 0),
                pack_cents_total=int(lot.get("clawback_pack_cents", 0)) + (
                    cents if counter == "clawback_pack_cents" else 0),
                already_clawed=lot["clawed_units"]),
            usage_repaid=int(lot.get("repaid_usage", 0)) - int(lot.get("usage_returned", 0)),
        )
        for lot in lots
    ]


def _recorded(lots: list[Doc], key: str) -> bool:
    return any(c["key"] == key for lot in lots for c in lot["clawbacks"])


@dataclass
class _Locked:
    """One organization's ledger as `Debits` keeps it between its bulk writes."""

    account: Doc  # as locked, then as the planned entries leave it
    lots: list[OpenLot]  # its open lots, as the planned entries leave them
    seq_taken: int = 0  # entries planned on it: each takes the next `seq`
    balance_delta: int = 0
    seq_delta: int = 0


@dataclass(frozen=True)
class PlannedDebit:
    """A debit worked out on `Debits`' copy of the ledger, not applied yet."""

    org_id: str
    balance_before: int
    balance_after: int
    draw: Draw


class Debits:
    """Debits (`EntryKind.DEBIT`) of several organizations in one transaction, with a fixed
    number of commands however many there are: what `Ledger.lock_in` + `Ledger.post_in` write
    for each, planned in memory and written in bulk.

    `lock` bumps the accounts' `seq` (the same lock as `lock_in`) and reads them and their open
    lots; `plan` works a debit out on that copy and `apply` keeps it; `flush` writes the lots
    drawn, the entries and the accounts. A debit that would do more than draw and add usage debt
    (trigger an automatic top-up, raise an alert) is for the caller to see from the
    `PlannedDebit` and to write through `Ledger.post_in` instead, after a `flush` and with a
    `forget` of that organization.
    """

    def __init__(self, ledger: Ledger, session: AsyncClientSession) -> None:
        self.db = ledger.db
        self.session = session
        self.locked: dict[str, _Locked] = {}
        self.entries: list[Doc] = []
        self.draws: dict[str, int] = {}

    async def lock(self, org_ids: set[str]) -> None:
        """Lock and read the organizations not locked yet: three commands for all of them."""
        new = sorted(org_ids - self.locked.keys())
        if not new:
            return
        locked = await self.db.accounts.bulk_write(
            [UpdateOne({"_id": org}, {"$inc": {"seq": 1}}) for org in new],
            ordered=False, session=self.session)
        if locked.matched_count != len(new):
            raise OrgNotFound(", ".join(new))
        accounts = {doc["_id"]: doc async for doc in self.db.accounts.find(
            {"_id": {"$in": new}}, session=self.session)}
        lots = await _open_lots_of(self.db, self.session, new)
        for org in new:
            self.locked[org] = _Locked(accounts[org], lots[org])

    def account(self, org_id: str) -> Doc:
        """The locked account as the debits planned so far leave it."""
        return self.locked[org_id].account

    def plan(self, org_id: str, units: int, now: datetime) -> PlannedDebit:
        balance = int(self.locked[org_id].account["balance"])
        return PlannedDebit(org_id, balance, balance - units,
                            plan_draw(self.locked[org_id].lots, units, now))

    def apply(self, planned: PlannedDebit, *, key: str, now: datetime, memo: str,
              meta: dict[str, Any] | None) -> Doc:
        """Keep `planned` as the organization's next entry (written by `flush`)."""
        state = self.locked[planned.org_id]
        account = state.account
        if state.seq_taken:  # the lock gave the first entry its seq; the next ones take more
            account["seq"] = int(account["seq"]) + 1
            state.seq_delta += 1
        state.seq_taken += 1
        amount = planned.balance_after - planned.balance_before
        entry = _entry(planned.org_id, int(account["seq"]), key, EntryKind.DEBIT, amount, memo,
                       now)
        _drawn(entry, planned.draw.draws, None, planned.draw.shortfall)
        _sealed(entry, planned.balance_after, meta)
        self.entries.append(entry)
        taken = dict(planned.draw.draws)
        state.lots = [replace(lot, remaining=lot.remaining - taken.get(lot.id, 0))
                      for lot in state.lots if lot.remaining > taken.get(lot.id, 0)]
        for lot_id, units in planned.draw.draws:
            self.draws[lot_id] = self.draws.get(lot_id, 0) + units
        account["balance"] = planned.balance_after
        account["usage_debt"] = int(account.get("usage_debt", 0)) + planned.draw.shortfall
        state.balance_delta += amount
        return entry

    async def flush(self, now: datetime) -> None:
        """Write what `apply` kept: one bulk write per collection."""
        if self.draws:
            drawn = await self.db.lots.bulk_write(
                [UpdateOne({"_id": lot, "remaining": {"$gte": units}},
                           {"$inc": {"remaining": -units}}) for lot, units in self.draws.items()],
                ordered=False, session=self.session)
            if drawn.matched_count != len(self.draws):
                raise RuntimeError("a lot changed under a locked account")
            self.draws = {}
        if self.entries:
            entries, self.entries = self.entries, []
            await self.db.ledger.insert_many(entries, ordered=True, session=self.session)
            for entry in entries:
                after_commit(self.session, LEDGER_ENTRIES.labels(entry["kind"]).inc)
        changed = [(org, state) for org, state in self.locked.items()
                   if state.balance_delta or state.seq_delta]
        if changed:
            await self.db.accounts.bulk_write([
                UpdateOne({"_id": org}, {
                    "$inc": {"balance": state.balance_delta, "seq": state.seq_delta},
                    "$set": {"usage_debt": int(state.account.get("usage_debt", 0)),
                             "other_debt": int(state.account.get("other_debt", 0)),
                             "updated_at": now},
                }) for org, state in changed
            ], ordered=False, session=self.session)
            for _, state in changed:
                state.balance_delta = state.seq_delta = 0

    def forget(self, org_id: str) -> None:
        """Drop an organization's copy (after a `flush`): a write through `Ledger` changed it."""
        assert not self.entries and not self.draws
        self.locked.pop(org_id, None)
