"""The write engine: the one place money is written (SPEC §5.1-§5.3, §5.6, §5.8).

A `Books` is one unit of work inside a caller's transaction. It reads what a change needs (the
accounts with their open lots, their weeks' meters, in one query each for however many
organizations), plans every change in memory with the pure rules of `billing.ledger` on
typed copies (`billing.store.documents`), and `flush` writes the result with one bulk command
per collection. A single ledger entry is its one-record case (`Ledger` loads, posts one entry
and flushes); a group of usage records is its many-record case (`billing.store.meters`): both
run the same planning code.

Locking: an account changed by the unit of work is written once, at `flush` (its `seq`,
balance, debts, notification counter and top-up state together). Transactions run on a
snapshot, and MongoDB refuses with a write conflict the write of a document that another
transaction changed since that snapshot, so a unit of work that planned on an account read
before someone else's change restarts and plans again (`run_in_transaction`). Every change of
money writes its account; that is what serializes them per organization. Likewise every grant,
settlement or release of a balance hold writes the meter that keeps it (`reserve`, `unreserve`),
which serializes the holds of an organization across processes (SPEC §5.11).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from billing.auto_topup import AutoTopUp, month_of, should_trigger, triggered
from billing.errors import NotFound, OrgNotFound
from billing.holds import Reservation
from billing.ledger import (
    Clawback,
    Debt,
    Draw,
    EntryKind,
    OpenLot,
    check_sign,
    plan_credit,
    plan_draw,
    plan_expiry,
)
from billing.metrics import LEDGER_ENTRIES
from billing.store import outbox
from billing.store.database import DUPLICATE_KEY, Database, Doc
from billing.store.documents import (
    Account,
    Entry,
    LotTerms,
    MeterWeek,
    lot_payment,
    lots_doc,
    new_lot,
)
from billing.store.notifications import NOTIFICATION_TYPES
from billing.store.transactions import after_commit, run_in_transaction

#: The collection of automatic top-up triggers (`billing.store.auto_topups`).
TRIGGERS = "auto_topups"
#: A trigger's status until its workflow charges it.
PENDING = "pending"


@dataclass(frozen=True)
class LedgerResult:
    applied: bool
    entry: Doc | None
    balance: int
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def amount(self) -> int:
        return int(self.entry["amount"]) if self.entry else 0


@dataclass
class _Changed:
    """What a unit of work changes on one account, written by `flush`."""

    entries: int = 0
    balance: int = 0
    notifications: int = 0
    debts: bool = False
    lots: bool = False  # a lot opened or was drawn from
    auto_topup: bool = False
    opening: Doc | None = None  # an account opened by this unit of work


@dataclass
class _MeterChange:
    used: int = 0
    overflow: int = 0
    sets: Doc = field(default_factory=dict)
    holds: bool = False  # a hold was granted, settled or released


@dataclass(frozen=True)
class _Note:
    org_id: str
    type: str
    key: str
    payload: Doc
    now: datetime


class Books:
    """One unit of work on money in `session`: load, plan in memory, `flush`."""

    def __init__(self, db: Database, session: AsyncClientSession) -> None:
        self.db = db
        self.session = session
        self.accounts: dict[str, Account] = {}
        self.meters: dict[tuple[str, str], MeterWeek] = {}
        self._changed: dict[str, _Changed] = {}
        self._meter_changes: dict[tuple[str, str], _MeterChange] = {}
        self._new_meters: set[tuple[str, str]] = set()
        self._new_lots: list[Doc] = []
        self._lot_updates: list[UpdateOne] = []
        self._entries: list[Doc] = []  # built once: the same document answers and is inserted
        self._notes: list[_Note] = []
        self._triggers: list[Doc] = []
        #: `(org_id, key)` of the notifications the last `flush` wrote
        self.notified: set[tuple[str, str]] = set()

    # ---- reading --------------------------------------------------------------------------------

    async def load(self, orgs: Iterable[str], weeks: Iterable[tuple[str, str]] = (), *,
                   opening: Doc | None = None) -> None:
        """Read the accounts of `orgs` and the meters of `weeks` (`(org_id, week)`) not read yet.
        `opening`: the account to open (written by `flush`) when its organization has none."""
        new = sorted(set(orgs) - self.accounts.keys())
        if new:
            async for doc in self.db.accounts.find({"_id": {"$in": new}}, session=self.session):
                self.accounts[doc["_id"]] = Account.from_doc(doc)
        if opening is not None and opening["_id"] not in self.accounts:
            self.accounts[opening["_id"]] = Account.from_doc(opening)
            self._change(opening["_id"]).opening = opening
        wanted = set(weeks) - self.meters.keys()
        if wanted:
            cursor = self.db.meters.find(
                {"org_id": {"$in": sorted({org for org, _ in wanted})},
                 "week": {"$in": sorted({week for _, week in wanted})}}, session=self.session)
            async for doc in cursor:
                if (doc["org_id"], doc["week"]) in wanted:
                    self.meters[(doc["org_id"], doc["week"])] = MeterWeek.from_doc(doc)

    def account(self, org_id: str) -> Account:
        """The account as the changes planned so far leave it."""
        account = self.accounts.get(org_id)
        if account is None:
            raise OrgNotFound(org_id)
        return account

    def meter(self, org_id: str, week: str) -> MeterWeek | None:
        return self.meters.get((org_id, week))

    def lots(self, org_id: str) -> list[OpenLot]:
        """The organization's open lots as the changes planned so far leave them."""
        return self.account(org_id).lots

    # ---- planning: the meter --------------------------------------------------------------------

    def open_meter(self, meter: MeterWeek) -> MeterWeek:
        """Open a week not stored yet (inserted by `flush`)."""
        key = (meter.org_id, meter.week)
        self.meters[key] = meter
        self._new_meters.add(key)
        self._meter_change(meter)
        return meter

    def add_usage(self, meter: MeterWeek, units: int, overflow: int = 0) -> None:
        meter.used += units
        change = self._meter_change(meter)
        change.used += units
        change.overflow += overflow

    def set_meter(self, meter: MeterWeek, **fields: Any) -> None:
        """Set fields of the meter (`runaway_alerted`, `reset_at`, `settled`) at `flush`."""
        for name, value in fields.items():
            setattr(meter, name, value)
        self._meter_change(meter).sets.update(fields)

    def reserve(self, meter: MeterWeek, reservation: Reservation) -> None:
        """Keep a granted hold on the meter of the week it is granted in."""
        meter.holds.append(reservation)
        self._meter_change(meter).holds = True

    def unreserve(self, meter: MeterWeek, hold_id: str, now: datetime) -> bool:
        """Take hold `hold_id` off the meter (settled or released) if it counts at `now`; False,
        and nothing changes, when it does not (not on this meter, expired)."""
        kept = [h for h in meter.holds if h.hold_id != hold_id or not h.active(now)]
        if len(kept) == len(meter.holds):
            return False
        meter.holds = kept
        self._meter_change(meter).holds = True
        return True

    def _meter_change(self, meter: MeterWeek) -> _MeterChange:
        return self._meter_changes.setdefault((meter.org_id, meter.week), _MeterChange())

    # ---- planning: the ledger -------------------------------------------------------------------

    def post(self, org_id: str, *, key: str, kind: EntryKind, amount: int, now: datetime,
             memo: str = "", terms: LotTerms | None = None, claw: Clawback | None = None,
             lot_id: str | None = None, meta: dict[str, Any] | None = None) -> LedgerResult:
        """Plan one entry: a positive one repays debt and opens a lot of the rest; a negative
        one draws as planned by `claw` (a refund or dispute), from its own lot `lot_id` (an
        expiry), or in debit order (a debit or an admin debit). A write that lowers a balance
        is where an automatic top-up is triggered (SPEC §5.8): every one passes here."""
        check_sign(kind, amount)
        account = self.account(org_id)
        account.seq += 1
        entry = Entry(org_id=org_id, seq=account.seq, key=key, kind=kind, amount=amount,
                      memo=memo, created_at=now, meta=meta)
        before = account.balance
        if amount > 0:
            self._credit(account, entry, terms or LotTerms())
        else:
            self._draw(account, entry, claw, lot_id)
        account.balance += amount
        entry.balance_after = account.balance
        doc = entry.to_doc()
        self._entries.append(doc)
        changed = self._change(org_id)
        changed.entries += 1
        changed.balance += amount
        changed.debts = True
        if amount < 0:
            self._trigger(account, before, now)
        return LedgerResult(True, doc, account.balance)

    def _credit(self, account: Account, entry: Entry, terms: LotTerms) -> None:
        repay = plan_credit(account.debt, entry.amount,
                            usage_debt_only=entry.kind is EntryKind.SETTLEMENT)
        entry.repaid = Debt(usage=repay.usage, other=repay.other)
        lot = new_lot(entry, terms)
        entry.lot_id = lot["_id"]
        self._new_lots.append(lot)
        if repay.lot_remaining > 0:
            account.lots.append(OpenLot(id=lot["_id"], remaining=repay.lot_remaining,
                                        expires_at=terms.expires_at, seq=entry.seq))
            self._change(account.org_id).lots = True
        account.usage_debt -= repay.usage
        account.other_debt -= repay.other

    def _draw(self, account: Account, entry: Entry, claw: Clawback | None,
              lot_id: str | None) -> None:
        wanted = -entry.amount
        if claw is not None:
            draws, added = claw.draws, Debt(usage=claw.usage_debt, other=claw.other_debt)
        else:
            planned = self._planned_draw(account, entry, lot_id, wanted)
            usage = planned.shortfall if entry.kind is EntryKind.DEBIT else 0
            draws, added = planned.draws, Debt(usage=usage, other=planned.shortfall - usage)
        if draws:
            taken = dict(draws)  # one draw per lot (`billing.ledger`)
            account.lots = [replace(lot, remaining=lot.remaining - taken.get(lot.id, 0))
                            for lot in account.lots if lot.remaining > taken.get(lot.id, 0)]
            self._change(account.org_id).lots = True
        entry.draws, entry.lot_id, entry.debt_added = list(draws), lot_id, added.total
        account.usage_debt += added.usage
        account.other_debt += added.other

    @staticmethod
    def _planned_draw(account: Account, entry: Entry, lot_id: str | None, units: int) -> Draw:
        lots = account.lots
        if lot_id is not None:
            own = next((lot for lot in lots if lot.id == lot_id), None)
            if own is None:
                raise NotFound(f"no open lot {lot_id!r}")
            return plan_expiry(own, units)
        if entry.kind in (EntryKind.DEBIT, EntryKind.ADJUSTMENT):
            return plan_draw(lots, units, entry.created_at)
        raise ValueError(f"a {entry.kind} entry names the lots it takes from")

    def _trigger(self, account: Account, balance_before: int, now: datetime) -> None:
        """Record a top-up when this write calls for one (`billing.auto_topup`)."""
        state, month = AutoTopUp.from_doc(account.auto_topup), month_of(now)
        if not should_trigger(state, balance_before=balance_before,
                              balance_after=account.balance, month=month):
            return
        new = triggered(state, account.org_id, month)
        assert new.in_flight is not None
        self._triggers.append({
            "_id": new.in_flight, "org_id": account.org_id, "n": new.triggers,
            "pack_id": new.pack_id, "month": month, "status": PENDING, **outbox.MARK,
            "payment_intent": None, "balance_after": account.balance, "created_at": now,
        })
        account.auto_topup = asdict(new)
        self._change(account.org_id).auto_topup = True

    def update_lot(self, lot_id: str, update: Doc) -> None:
        """A change of a lot's own record (its clawbacks, its sweep), written by `flush`."""
        self._lot_updates.append(UpdateOne({"_id": lot_id}, update))

    # ---- planning: notifications ----------------------------------------------------------------

    def notify(self, org_id: str, *, type: str, key: str, payload: Doc, now: datetime) -> None:
        """A notification, written by `flush` once per `(org_id, key)` (`notify`, below)."""
        if type not in NOTIFICATION_TYPES:
            raise ValueError(f"unknown notification type {type!r}")
        self._notes.append(_Note(org_id, type, key, payload, now))

    # ---- writing --------------------------------------------------------------------------------

    async def flush(self, now: datetime) -> None:
        """Write what was planned, one bulk command per collection, stamped `now`; the unit of
        work can go on planning from the state written."""
        await self._flush_meters(now)
        await self._flush_lots()
        if self._entries:
            entries, self._entries = self._entries, []
            await insert(self.db.ledger, entries, self.session)
            for entry in entries:
                after_commit(self.session, LEDGER_ENTRIES.labels(entry["kind"]).inc)
        if self._triggers:
            triggers, self._triggers = self._triggers, []
            await insert(self.db[TRIGGERS], triggers, self.session)
        await self._flush_notes()
        await self._flush_accounts(now)

    async def _flush_meters(self, now: datetime) -> None:
        changes, self._meter_changes = self._meter_changes, {}
        new, self._new_meters = self._new_meters, set()
        if new:
            for key in new:
                _prune(self.meters[key], now)
            opened = [self.meters[key].new_doc(changes[key].overflow, now) for key in sorted(new)]
            await insert(self.db.meters, opened, self.session)
            for doc in opened:
                self.meters[(doc["org_id"], doc["week"])].id = doc["_id"]
        updates = [self._meter_update(self.meters[key], change, now)
                   for key, change in changes.items() if key not in new]
        if updates:
            await self.db.meters.bulk_write(updates, ordered=False, session=self.session)

    @staticmethod
    def _meter_update(meter: MeterWeek, change: _MeterChange, now: datetime) -> UpdateOne:
        """A meter's increments and fields; its holds when they changed or some expired (pruned
        whenever the meter is written anyway: an expired hold counts for nothing already)."""
        sets = {**change.sets, "updated_at": now}
        if _prune(meter, now) or change.holds:
            sets["holds"] = meter.holds_doc()
        return UpdateOne({"_id": meter.id},
                         {"$inc": {"used": change.used, "overflow": change.overflow},
                          "$set": sets})

    async def _flush_lots(self) -> None:
        if self._new_lots:
            new, self._new_lots = self._new_lots, []
            payments = [doc for doc in map(lot_payment, new) if doc is not None]
            if payments:  # first: a purchase line credited twice stops at its unique index
                await insert(self.db.lot_payments, payments, self.session)
            await insert(self.db.lots, new, self.session)
        if self._lot_updates:
            updates, self._lot_updates = self._lot_updates, []
            await self.db.lots.bulk_write(updates, ordered=True, session=self.session)

    async def _flush_notes(self) -> None:
        """Insert the planned notifications not stored yet, each taking its organization's next
        `seq` (the account's `notification_seq`): gapless, and in the outbox (SPEC §5.6-5.7)."""
        notes, self._notes = self._notes, []
        self.notified = set()
        unique: dict[tuple[str, str], _Note] = {}
        for note in notes:
            unique.setdefault((note.org_id, note.key), note)
        if not unique:
            return
        cursor = self.db.notifications.find(
            {"org_id": {"$in": sorted({org for org, _ in unique})},
             "key": {"$in": sorted({key for _, key in unique})}},
            {"org_id": 1, "key": 1}, session=self.session)
        stored = {(doc["org_id"], doc["key"]) async for doc in cursor}
        await self.load(org for org, _ in unique)
        docs: list[Doc] = []
        for (org_id, key), note in unique.items():
            if (org_id, key) in stored:
                continue
            account = self.account(org_id)
            account.notification_seq += 1
            self._change(org_id).notifications += 1
            docs.append({"org_id": org_id, "key": key, "type": note.type,
                         "payload": note.payload, "created_at": note.now, **outbox.MARK,
                         "seq": account.notification_seq})
            self.notified.add((org_id, key))
        if docs:
            await insert(self.db.notifications, docs, self.session)

    async def _flush_accounts(self, now: datetime) -> None:
        changed, self._changed = self._changed, {}
        updates = [self._account_update(self.accounts[org], change, now)
                   for org, change in changed.items()]
        if not updates:
            return
        written = await self.db.accounts.bulk_write(updates, ordered=False, session=self.session)
        if written.matched_count + written.upserted_count != len(updates):
            raise OrgNotFound(", ".join(sorted(changed)))

    @staticmethod
    def _account_update(account: Account, change: _Changed, now: datetime) -> UpdateOne:
        inc = {name: n for name, n in (("seq", change.entries), ("balance", change.balance),
                                       ("notification_seq", change.notifications)) if n}
        sets: Doc = {}
        if change.debts:
            sets.update(usage_debt=account.usage_debt, other_debt=account.other_debt)
        if change.lots:
            sets["lots"] = lots_doc(account.lots)
        if change.auto_topup:
            sets["auto_topup"] = account.auto_topup
        if change.entries or change.auto_topup:
            sets["updated_at"] = now
        update: Doc = {"$inc": inc} if inc else {}
        if sets:
            update["$set"] = sets
        if change.opening is None:
            return UpdateOne({"_id": account.org_id}, update)
        update["$setOnInsert"] = {name: value for name, value in change.opening.items()
                                  if name != "_id" and name not in inc and name not in sets}
        return UpdateOne({"_id": account.org_id}, update, upsert=True)

    def _change(self, org_id: str) -> _Changed:
        return self._changed.setdefault(org_id, _Changed())


def _prune(meter: MeterWeek, now: datetime) -> bool:
    """Drop the holds expired at `now` from the meter; True when there were some."""
    active = [h for h in meter.holds if h.active(now)]
    pruned = len(active) != len(meter.holds)
    meter.holds = active
    return pruned


async def notify(db: Database, session: AsyncClientSession | None, *, org_id: str, type: str,
                 key: str, payload: Doc, now: datetime) -> bool:
    """Record a notification once per `(org_id, key)` in the caller's transaction (its own
    without a session); True when this call wrote it.

    The key makes "exactly once" hold under retries and concurrency: `meter.threshold_crossed`
    for week W and threshold 80 has the key `meter.threshold_crossed:W:80`, and a second writer
    finds it there (or, writing at the same moment, conflicts on the unique index and starts
    again). A new notification takes the organization's next `seq` in the same transaction, so
    the sequence has no gap and no repeat and a reader paging by `seq` never misses one. It
    enters the outbox in the same transaction, so its outbound deliveries (SPEC §5.7) are
    started after commit even across a crash."""

    async def write(own: AsyncClientSession) -> bool:
        books = Books(db, own)
        books.notify(org_id, type=type, key=key, payload=payload, now=now)
        await books.flush(now)
        return (org_id, key) in books.notified

    if session is None:
        return await run_in_transaction(db.client, write)
    return await write(session)


async def insert(collection: AsyncCollection[Doc], docs: list[Doc],
                  session: AsyncClientSession) -> None:
    """Insert `docs` in order; a duplicate key raises `DuplicateKeyError` whether one document
    or many were inserted."""
    try:
        if len(docs) == 1:
            await collection.insert_one(docs[0], session=session)
        else:
            await collection.insert_many(docs, ordered=True, session=session)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if errors and errors[0].get("code") == DUPLICATE_KEY:
            raise DuplicateKeyError(errors[0].get("errmsg", "duplicate key"), DUPLICATE_KEY,
                                    errors[0]) from exc
        raise
