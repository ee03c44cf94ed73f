"""The documents money is kept in, typed, with their BSON in this one module (SPEC §5.1-§5.3).

`billing.store.books` plans every change of money on these in memory and writes them; nothing
else builds an account's, a lot's, an entry's or a week's meter fields by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bson import ObjectId

from billing.holds import Reservation
from billing.ledger import Debt, EntryKind, OpenLot
from billing.store.database import SWEEP_AT, Doc


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


#: The account's field keeping its copy of the subscription standing.
STANDING = "standing"


def standing_doc(status: str | None, past_due_since: datetime | None) -> Doc:
    """An account's copy of its organization's subscription standing (its `STANDING` field)."""
    return {"status": status, "past_due_since": past_due_since}


@dataclass
class Account:
    """The money fields of an account (`accounts`), as read and then as planned changes leave
    them. Fields the ledger does not own (Stripe ids, timestamps) stay in the stored document.

    `lots` are the organization's open lots (units left), kept on the account because every
    change of a lot's units is a change of the balance, which writes the account anyway: a
    debit writes one document where it wrote two, and reads none more. A lot that runs out
    leaves the list; its record in `lots` (what it was bought with, its clawbacks) stays.

    `status` and `past_due_since` are read only: the copy of the organization's subscription
    standing that `billing.store.subscriptions` writes with it (`standing_doc`), so the gate,
    a hold and a week's opening plan read one document, not two (None: no subscription)."""

    org_id: str
    balance: int
    seq: int  # the last ledger entry's `seq`
    usage_debt: int
    other_debt: int
    notification_seq: int
    plan_id: str | None
    seats: int
    auto_topup: Doc | None
    lots: list[OpenLot]
    status: str | None = None
    past_due_since: datetime | None = None

    @classmethod
    def from_doc(cls, doc: Doc) -> Account:
        standing = doc.get(STANDING) or {}
        return cls(org_id=doc["_id"], balance=int(doc.get("balance", 0)),
                   seq=int(doc.get("seq", 0)), usage_debt=int(doc.get("usage_debt", 0)),
                   other_debt=int(doc.get("other_debt", 0)),
                   notification_seq=int(doc.get("notification_seq", 0)),
                   plan_id=doc.get("plan_id"), seats=int(doc.get("seats") or 1),
                   auto_topup=doc.get("auto_topup"), lots=open_lots(doc),
                   status=standing.get("status"), past_due_since=standing.get("past_due_since"))

    @property
    def debt(self) -> Debt:
        return Debt(usage=self.usage_debt, other=self.other_debt)



def lots_doc(lots: Iterable[OpenLot]) -> list[Doc]:
    """An account's `lots` field: each open lot's id, units left, expiry and `seq`."""
    return [{"id": lot.id, "remaining": lot.remaining, "expires_at": lot.expires_at,
             "seq": lot.seq} for lot in lots]


def units_left(lots: Iterable[OpenLot]) -> dict[str, int]:
    """What each open lot has left, by lot id (a lot not there has run out)."""
    return {lot.id: lot.remaining for lot in lots}


def open_lots(account: Doc) -> list[OpenLot]:
    """An account's open lots (its `lots` field) as the draw rules of `billing.ledger` take
    them. An account without the field is refused rather than read as having none: it is one
    of an earlier release's database that the start-up migration has not moved yet."""
    if "lots" not in account:
        raise RuntimeError(f"account {account['_id']!r} has no open lots field: a database of "
                           "an earlier release that the start-up migration has not brought up "
                           "yet (RUNBOOKS §12)")
    return [OpenLot(id=doc["id"], remaining=int(doc["remaining"]),
                    expires_at=doc.get("expires_at"), seq=int(doc["seq"]))
            for doc in account["lots"]]


@dataclass
class MeterWeek:
    """One organization's meter for one ISO week (`meters`): `used` against the quota of the
    plan snapshot it is metered on, `overflow`, every unit debited past that quota, and `holds`,
    the balance holds granted in the week that may still count (SPEC §5.11).

    `id` is None for a week opened by the unit of work that holds it (inserted at its write)."""

    org_id: str
    week: str
    used: int
    quota: int
    plan_id: str
    ratio_version: str | None
    id: ObjectId | None = None
    runaway_alerted: bool = False
    reset_at: datetime | None = None
    settled: int = 0
    holds: list[Reservation] = field(default_factory=list)

    @classmethod
    def from_doc(cls, doc: Doc) -> MeterWeek:
        return cls(org_id=doc["org_id"], week=doc["week"], used=int(doc["used"]),
                   quota=int(doc["quota"]), plan_id=str(doc["plan_id"]),
                   ratio_version=doc.get("ratio_version"), id=doc["_id"],
                   runaway_alerted=bool(doc.get("runaway_alerted")),
                   reset_at=doc.get("reset_at"), settled=int(doc.get("settled", 0)),
                   holds=[Reservation(h["hold_id"], int(h["units"]), h["expires_at"])
                          for h in doc.get("holds", ())])

    def holds_doc(self) -> list[Doc]:
        """The `holds` field: each hold's id, units and expiry."""
        return [{"hold_id": h.hold_id, "units": h.units, "expires_at": h.expires_at}
                for h in self.holds]

    def new_doc(self, overflow: int, now: datetime) -> Doc:
        """The document of a week opened now. `overflow_counted`: its `overflow` counts every
        unit debited past its quota (what reconciliation compares with the week's usage
        debits); a meter opened before the counter existed has no such flag."""
        doc: Doc = {"org_id": self.org_id, "week": self.week, "used": self.used,
                    "quota": self.quota, "plan_id": self.plan_id,
                    "ratio_version": self.ratio_version, "overflow": overflow,
                    "overflow_counted": True, "created_at": now, "updated_at": now}
        if self.runaway_alerted:
            doc["runaway_alerted"] = True
        if self.reset_at is not None:
            doc.update(reset_at=self.reset_at, settled=self.settled)
        if self.holds:
            doc["holds"] = self.holds_doc()
        return doc


@dataclass
class Entry:
    """A ledger entry (`ledger`), unique by `(org_id, key)` and numbered by the account's `seq`.

    A positive entry opens the lot `lot_id` and records the debt it `repaid`; a negative one
    records its `draws` from lots and the debt it added (what no lot covered)."""

    org_id: str
    seq: int
    key: str
    kind: EntryKind
    amount: int
    memo: str
    created_at: datetime
    balance_after: int = 0
    lot_id: str | None = None
    repaid: Debt | None = None
    draws: list[tuple[str, int]] = field(default_factory=list)
    debt_added: int = 0
    meta: dict[str, Any] | None = None
    id: ObjectId = field(default_factory=ObjectId)

    def to_doc(self) -> Doc:
        doc: Doc = {"_id": self.id, "org_id": self.org_id, "seq": self.seq, "key": self.key,
                    "kind": self.kind.value, "amount": self.amount, "lot_id": self.lot_id,
                    "memo": self.memo, "created_at": self.created_at}
        if self.amount > 0:
            repaid = self.repaid or Debt(0, 0)
            doc["repaid"] = {"other": repaid.other, "usage": repaid.usage}
        else:
            doc["draws"] = [{"lot_id": lot, "units": units} for lot, units in self.draws]
            if self.debt_added:
                doc["debt_added"] = self.debt_added
        doc["balance_after"] = self.balance_after
        if self.meta:
            doc["meta"] = self.meta
        return doc


def new_lot(entry: Entry, terms: LotTerms) -> Doc:
    """The record of the lot a positive entry opens (its units left are on the account).
    `sweep_at`: its expiry, until the expiry sweep has looked at it (`Ledger.expire`)."""
    repaid = entry.repaid or Debt(0, 0)
    doc: Doc = {
        "_id": lot_id_of(entry), "org_id": entry.org_id, "kind": entry.kind.value,
        "key": entry.key, "seq": entry.seq, "units": entry.amount,
        "repaid_debt": repaid.other + repaid.usage, "repaid_usage": repaid.usage,
        "line": terms.line, "expires_at": terms.expires_at,
        "payment_intent": terms.payment_intent, "charge": terms.charge,
        "checkout_session": terms.checkout_session, "pack_id": terms.pack_id,
        "price_cents": terms.price_cents, "paid_cents": terms.paid_cents,
        "source_lot": terms.source_lot, "clawbacks": [], "clawback_cents": 0,
        "clawed_units": 0, "usage_returned": 0, "created_at": entry.created_at,
    }
    if terms.expires_at is not None:
        doc[SWEEP_AT] = terms.expires_at
    return doc


def lot_payment(lot: Doc) -> Doc | None:
    """What a purchased lot is found by (`lot_payments`): its payment intent and line, its
    charge. None for a lot no payment bought."""
    paid_with = lot.get("payment_intent") or lot.get("charge")
    if lot.get("kind") != EntryKind.TOPUP.value or not paid_with:
        return None
    return {"_id": lot["_id"], "org_id": lot["org_id"], "kind": lot["kind"],
            "payment_intent": lot.get("payment_intent"), "line": lot.get("line"),
            "charge": lot.get("charge"), "price_cents": lot.get("price_cents")}


def lot_id_of(entry: Entry) -> str:
    return f"lot_{entry.id}"


@dataclass(frozen=True)
class Clawed:
    """A clawback a purchased lot keeps (a refund or dispute, or the reinstatement undoing one,
    with negative figures): what it took, so that the cumulative total stays exact even when one
    rounds to zero units. `voided_by`: a clawback that will never apply, its reversal having
    come first."""

    key: str
    cents: int
    scope: str | None
    units: int
    usage: int
    voided_by: str | None = None

    @classmethod
    def from_doc(cls, doc: Doc) -> Clawed:
        return cls(key=doc["key"], cents=int(doc["cents"]), scope=doc.get("scope"),
                   units=int(doc.get("units", 0)), usage=int(doc.get("usage", 0)),
                   voided_by=doc.get("voided_by"))

    def to_doc(self) -> Doc:
        doc: Doc = {"key": self.key, "cents": self.cents, "scope": self.scope,
                    "units": self.units, "usage": self.usage}
        if self.voided_by is not None:
            doc["voided_by"] = self.voided_by
        return doc


#: Where a lot counts the cents of the clawbacks standing against it, by `billing_scope`: none
#: (spread over everything the charge paid for), `packs` (over the pack lines only); `other`
#: takes nothing and counts nowhere.
_STANDING = {"": "clawback_cents", "packs": "clawback_pack_cents"}


@dataclass(frozen=True)
class PurchasedLot:
    """A lot a payment bought, as refunds and disputes read it (`lots`): what its line cost,
    what the charge paid for everything, and the clawbacks standing against it."""

    id: str
    seq: int
    units: int
    expires_at: datetime | None
    price_cents: int
    paid_cents: int | None
    charge: str | None
    payment_intent: str | None
    repaid_usage: int
    usage_returned: int
    clawed_units: int
    standing_cents: int  # of clawbacks without scope
    standing_pack_cents: int  # of clawbacks scoped to the packs
    clawbacks: tuple[Clawed, ...]

    @classmethod
    def from_doc(cls, doc: Doc) -> PurchasedLot:
        return cls(
            id=doc["_id"], seq=int(doc["seq"]), units=int(doc["units"]),
            expires_at=doc.get("expires_at"),
            price_cents=int(doc.get("price_cents") or 0), paid_cents=doc.get("paid_cents"),
            charge=doc.get("charge"), payment_intent=doc.get("payment_intent"),
            repaid_usage=int(doc.get("repaid_usage", 0)),
            usage_returned=int(doc.get("usage_returned", 0)),
            clawed_units=int(doc.get("clawed_units", 0)),
            standing_cents=int(doc.get("clawback_cents", 0)),
            standing_pack_cents=int(doc.get("clawback_pack_cents", 0)),
            clawbacks=tuple(Clawed.from_doc(c) for c in doc.get("clawbacks", [])))

    def open_in(self, lots: Iterable[OpenLot]) -> OpenLot:
        """The lot with the units it has left among the account's open `lots` (none when it
        is not there: run out)."""
        return OpenLot(id=self.id, remaining=units_left(lots).get(self.id, 0),
                       expires_at=self.expires_at, seq=self.seq)

    def clawed(self, key: str) -> Clawed | None:
        return next((c for c in self.clawbacks if c.key == key), None)

    def standing_after(self, scope: str | None, cents: int) -> tuple[int, int]:
        """The cents standing without scope and scoped to the packs once `cents` of `scope`
        are added (negative: withdrawn)."""
        counter = _STANDING.get(scope or "")
        return (self.standing_cents + (cents if counter == "clawback_cents" else 0),
                self.standing_pack_cents + (cents if counter == "clawback_pack_cents" else 0))

    def keep(self, clawed: Clawed) -> Doc:
        """The update by which the lot keeps `clawed` and counts it where its scope stands."""
        counter = _STANDING.get(clawed.scope or "")
        counted = {counter: clawed.cents} if counter and clawed.cents else {}
        return {"$push": {"clawbacks": clawed.to_doc()},
                "$inc": {**counted, "clawed_units": clawed.units, "usage_returned": clawed.usage}}


def clawback_recorded(lots: Iterable[PurchasedLot], key: str) -> bool:
    """The lots already hold the clawback `key` (applied, or voided by a reversal that came
    first)."""
    return any(lot.clawed(key) is not None for lot in lots)
