"""The rules of the credit ledger (SPEC §5.1), pure: no database, no clock.

An organization's extras are a set of credit **lots** and a **debt**. Every positive entry opens a
lot, which first repays debt; every negative entry takes units from lots and, where no lot can
cover it, adds to the debt. At all times

    balance == sum(entries) == sum(lot.remaining) - debt.usage - debt.other

`debt.usage` is the part owed because usage was debited without cover; it is the only part the
weekly settlement may forgive (SPEC §5.3). Everything else (refunds and disputes beyond what their
lot still holds, admin debits) is `debt.other`. A positive entry repays `other` before `usage`, so
the settlement can still cover the usage part. The store (`billing.store.ledger`) applies these
plans in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from billing.errors import InvalidInput
from billing.money import round_half_up_div


class EntryKind(StrEnum):
    TOPUP = "topup"
    GRANT = "grant"
    ADJUSTMENT = "adjustment"
    REINSTATEMENT = "reinstatement"
    SETTLEMENT = "settlement"
    DEBIT = "debit"
    REFUND = "refund"
    DISPUTE = "dispute"
    EXPIRATION = "expiration"


POSITIVE_KINDS = frozenset(
    {EntryKind.TOPUP, EntryKind.GRANT, EntryKind.REINSTATEMENT, EntryKind.SETTLEMENT}
)
NEGATIVE_KINDS = frozenset(
    {EntryKind.DEBIT, EntryKind.REFUND, EntryKind.DISPUTE, EntryKind.EXPIRATION}
)


def check_sign(kind: EntryKind, amount: int) -> None:
    """Entries are signed by kind and never zero; `adjustment` may be either sign."""
    if amount == 0:
        raise InvalidInput("zero-amount entries are never written", code="ZERO_AMOUNT")
    if kind in POSITIVE_KINDS and amount < 0:
        raise InvalidInput(f"a {kind} entry must be positive", code="WRONG_SIGN")
    if kind in NEGATIVE_KINDS and amount > 0:
        raise InvalidInput(f"a {kind} entry must be negative", code="WRONG_SIGN")


@dataclass(frozen=True)
class Debt:
    usage: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.usage + self.other

    def __add__(self, added: Debt) -> Debt:
        return Debt(usage=self.usage + added.usage, other=self.other + added.other)


@dataclass(frozen=True)
class OpenLot:
    """What a draw needs to know about a lot."""

    id: str
    remaining: int
    expires_at: datetime | None
    seq: int


@dataclass(frozen=True)
class Repayment:
    """How a new positive entry of `units` splits between debt and the new lot."""

    other: int
    usage: int
    lot_remaining: int


def plan_credit(debt: Debt, units: int, *, usage_debt_only: bool = False) -> Repayment:
    """A new lot of `units` first repays debt (`other` first); the rest stays in the lot.

    A settlement repays usage debt only (`usage_debt_only`): it is the week's quota covering
    usage, never a refund or a dispute.
    """
    if units <= 0:
        raise ValueError("a credit opens a lot of positive units")
    other = 0 if usage_debt_only else min(debt.other, units)
    usage = min(debt.usage, units - other)
    return Repayment(other=other, usage=usage, lot_remaining=units - other - usage)


def drawable(lots: list[OpenLot], now: datetime) -> list[OpenLot]:
    """Lots a debit may draw from, in draw order: earliest `expires_at` first, lots without
    expiry last, ties oldest first. Expired lots are left for the expiry sweep."""
    live = [
        lot for lot in lots
        if lot.remaining > 0 and (lot.expires_at is None or lot.expires_at > now)
    ]
    return sorted(
        live,
        key=lambda lot: (lot.expires_at is None, lot.expires_at or now, lot.seq),
    )


@dataclass(frozen=True)
class Draw:
    draws: tuple[tuple[str, int], ...]
    shortfall: int


def plan_expiry(lot: OpenLot, units: int) -> Draw:
    """An expiry takes `units` from its own lot only, even past its expiry."""
    if units <= 0:
        raise ValueError("an expiry takes positive units")
    taken = min(lot.remaining, units)
    return Draw(draws=((lot.id, taken),) if taken else (), shortfall=units - taken)


@dataclass(frozen=True)
class ClawShare:
    """One lot of a purchase and what a refund or dispute takes back from it."""

    lot: OpenLot
    units: int
    #: Units of this lot that repaid usage debt when it opened and have not come back yet.
    usage_repaid: int = 0


@dataclass(frozen=True)
class Clawback:
    draws: tuple[tuple[str, int], ...]
    usage_debt: int
    other_debt: int
    #: Per lot of the purchase, the units of its usage-debt repayment that came back.
    usage_returned: tuple[tuple[str, int], ...]


def plan_purchase_clawback(
    shares: list[ClawShare], others: list[OpenLot], now: datetime
) -> Clawback:
    """A refund or dispute takes each lot's share from that lot first; what a lot no longer holds
    is drawn from every lot that still holds units, in debit order (the purchase's other lots,
    after their own share, included), and only what no lot covers becomes debt, so debt never
    stands beside lots that still hold units (a later expiry can never take units twice).

    Units a purchased lot spent repaying usage debt come back as usage debt (the weekly
    settlement may still forgive them); the rest of the debt is `other`. Lots cover the `other`
    part first.
    """
    if any(share.units < 0 for share in shares) or not any(share.units for share in shares):
        raise ValueError("a clawback takes positive units")
    own = {share.lot.id for share in shares}
    draws: dict[str, int] = {}
    returned: list[tuple[str, int]] = []
    rest: list[OpenLot] = []
    shortfall = usage_origin = 0
    for share in shares:
        taken = min(share.lot.remaining, share.units)
        if taken:
            draws[share.lot.id] = taken
        rest.append(replace(share.lot, remaining=share.lot.remaining - taken))
        short = share.units - taken
        usage = min(short, share.usage_repaid)
        if usage:
            returned.append((share.lot.id, usage))
        shortfall += short
        usage_origin += usage
    debt = 0
    if shortfall:
        pool = [lot for lot in others if lot.id not in own] + rest
        covered = plan_draw([lot for lot in pool if lot.remaining > 0], shortfall, now)
        for lot_id, units in covered.draws:
            draws[lot_id] = draws.get(lot_id, 0) + units
        debt = covered.shortfall
    usage_debt = min(debt, usage_origin)
    return Clawback(draws=tuple(draws.items()), usage_debt=usage_debt,
                    other_debt=debt - usage_debt,
                    usage_returned=_first_units(returned, usage_debt))


def _first_units(parts: list[tuple[str, int]], total: int) -> tuple[tuple[str, int], ...]:
    """`parts` cut down, in order, to `total` units: a lot gives back as usage debt only what
    became usage debt; what other lots covered stays repaid usage for a later clawback."""
    kept: list[tuple[str, int]] = []
    for lot_id, units in parts:
        take = min(units, total)
        if take:
            kept.append((lot_id, take))
        total -= take
    return tuple(kept)


def plan_draw(lots: list[OpenLot], units: int, now: datetime) -> Draw:
    """A debit takes `units` from lots in draw order.

    Never fails for lack of balance: what no lot covers is the `shortfall`, which becomes debt.
    """
    if units <= 0:
        raise ValueError("a draw takes positive units")
    ordered = drawable(lots, now)
    left = units
    draws: list[tuple[str, int]] = []
    for lot in ordered:
        if left == 0:
            break
        take = min(lot.remaining, left)
        draws.append((lot.id, take))
        left -= take
    return Draw(draws=tuple(draws), shortfall=left)


def clawback_units(
    *, lot_units: int, lot_price_cents: int, clawed_cents_total: int, already_clawed: int,
    paid_cents: int | None = None, pack_cents_total: int = 0,
) -> int:
    """Units a refund or dispute takes back from a lot bought with the charge.

    A refund is spread pro rata over everything the charge paid for (`paid_cents`, default the
    pack lines' cost `lot_price_cents`): refunding 2500 cents of a 7400-cent cart (a 4900-cent
    500000-unit pack and a 2500-cent T-shirt) claws back 168919 units, about a third of the
    pack. Refunds whose metadata says `billing_scope: "packs"` (`pack_cents_total`) are spread
    over the pack lines only: 2450 of them claw back half the pack.

    Cumulative rounding: `clawed_total = round_half_up(units * (cents / paid + pack_cents /
    price))`, rounded once over everything standing, capped at what the lot bought, and this
    clawback is `clawed_total - already_clawed`. Partial refunds therefore always add up exactly
    (1633 + 1633 + 1634 cents of a 4900-cent 500000-unit pack claw back exactly 500000 units),
    and refunds never claw back more than was bought. For a cart of several packs,
    `lot_price_cents` is what all its pack lines cost together, so each lot gives back the same
    share of itself.
    """
    if lot_price_cents <= 0:
        raise ValueError("a purchased lot has a positive price")
    paid = max(paid_cents or lot_price_cents, lot_price_cents)
    numerator = lot_units * (max(clawed_cents_total, 0) * lot_price_cents
                             + max(pack_cents_total, 0) * paid)
    clawed_total = min(lot_units, round_half_up_div(numerator, paid * lot_price_cents))
    return max(clawed_total - already_clawed, 0)


def reinstated_units(
    *, lot_units: int, lot_price_cents: int, standing_cents_total: int, clawed_units: int,
    paid_cents: int | None = None, standing_pack_cents: int = 0,
) -> int:
    """Units a failed or canceled refund, or a reinstated dispute, gives back to a lot.

    What a lot has lost is always what the refunds and disputes still standing say:
    `clawed_total` is computed again from their cents (`clawback_units`), and the lot gets back
    what it lost beyond that. Giving back "what the reversed clawback took" would be wrong
    after a cap: on a 4900-cent 500000-unit pack, a pending refund of 500 cents takes 51020 units
    and a refund of 4900 hits the cap (448980 more); when the 500 fails, the 4900 still standing
    is the whole pack, so 0 units come back, not 51020.
    """
    standing = clawback_units(lot_units=lot_units, lot_price_cents=lot_price_cents,
                              clawed_cents_total=standing_cents_total, already_clawed=0,
                              paid_cents=paid_cents, pack_cents_total=standing_pack_cents)
    return max(clawed_units - standing, 0)
