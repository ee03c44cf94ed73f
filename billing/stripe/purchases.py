"""What a payment bought (SPEC §5.5): the pack lines to credit, one rule for every path.

A Checkout session's line items are the truth: each line whose price is one of a pack's
`stripe_price_ids` credits `pack.units x quantity`, and its lot's price is what that line cost.
Metadata naming a pack covers a payment made without Checkout (a bare payment intent), which buys
one pack for what it received. Lines none of which has a pack's price, in a purchase whose
metadata names a pack or an organization, are never guessed at: `unresolved`.

The same rule decides, for a refund or a dispute whose purchase is not credited yet, whether
there is a purchase to wait for at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from billing.stripe.objects import Obj, amount, pack_from, ref_id

if TYPE_CHECKING:
    from billing.config import BillingConfig, PackConfig

#: Checkout payment statuses that mean the money is in (a 100 % discount needs no payment).
PAID_STATUSES = frozenset({"paid", "no_payment_required"})


class Verdict(StrEnum):
    CREDIT = "credit"  # pack lines to credit
    IGNORED = "ignored"  # the payment bought no pack
    UNRESOLVED = "unresolved"  # a pack was bought, but which one cannot be told


@dataclass(frozen=True)
class PurchaseLine:
    pack: PackConfig
    quantity: int
    price_cents: int

    @property
    def units(self) -> int:
        return self.pack.units * self.quantity

    def expires_at(self, bought_at: datetime) -> datetime | None:
        """Expiry counts from when the customer paid (the event's `created`), not from when a
        retried or replayed run processed it."""
        days = self.pack.expiry_days
        return bought_at + timedelta(days=days) if days else None


@dataclass(frozen=True)
class Purchase:
    verdict: Verdict
    lines: tuple[PurchaseLine, ...] = ()
    reason: str | None = None


def _ignored(reason: str) -> Purchase:
    return Purchase(Verdict.IGNORED, reason=reason)


def _unresolved(reason: str) -> Purchase:
    return Purchase(Verdict.UNRESOLVED, reason=reason)


def _line(pack: PackConfig, quantity: object, cost: object) -> PurchaseLine | None:
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        quantity = 1 if quantity is None else 0
    if quantity < 1:
        return None
    paid = amount(cost)
    return PurchaseLine(pack, quantity, paid if paid > 0 else pack.price_cents * quantity)


def _pack_lines(config: BillingConfig, line_items: list[Obj]) -> list[PurchaseLine] | Purchase:
    """The lines whose price is a pack's, or `unresolved` for a pack line without a positive
    quantity."""
    lines: list[PurchaseLine] = []
    for item in line_items:
        price = ref_id(item.get("price"))
        pack = config.pack_for_price(price) if price else None
        if pack is None:
            continue
        line = _line(pack, item.get("quantity"), item.get("amount_total"))
        if line is None:
            return _unresolved(f"line item {item.get('id')} has no positive quantity")
        lines.append(line)
    return lines


def resolve_purchase(
    config: BillingConfig,
    *,
    line_items: list[Obj] | None,
    metadata: tuple[Obj | None, ...] = (),
    paid_cents: int = 0,
    invoice: str | None = None,
    names_org: bool = False,
    recorded_pack: str | None = None,
) -> Purchase:
    """The pack lines a payment bought.

    `line_items` are the Checkout session's (None: the payment had no Checkout session);
    `metadata` the objects whose `metadata.pack_id` may name the pack (session, payment intent,
    charge); `paid_cents` what a payment without Checkout received; `invoice` the invoice a
    payment settled (a subscription's: never a pack); `names_org` whether the payment's
    metadata names an organization; `recorded_pack` the pack of the engine's own checkout record
    (SPEC §5.9), which comes before any metadata.

    A Checkout line of `price_pack_500k_eur` (listed by pack_500k) credits 500000 units; a
    single line of an unlisted `price_pack_500k_2019` with `metadata.pack_id = "pack_500k"` is
    `unresolved` (which units that Price buys cannot be told); a T-shirt alone, with no billing
    metadata, is `ignored`.
    """
    if invoice is not None:
        return _ignored(f"the payment settles invoice {invoice}")
    named = recorded_pack or pack_from(*metadata)
    named_pack = config.packs_by_id.get(named) if named else None
    if named is not None and named_pack is None:
        return _unresolved(f"unknown pack {named!r}")
    if line_items is None:
        if named_pack is None:
            return _ignored("no pack in metadata and no Checkout session: not a credit purchase")
        line = _line(named_pack, 1, paid_cents)
        assert line is not None
        return Purchase(Verdict.CREDIT, (line,))
    lines = _pack_lines(config, line_items)
    if isinstance(lines, Purchase):
        return lines
    if lines:
        return Purchase(Verdict.CREDIT, tuple(lines))
    if line_items:
        if named_pack is not None:
            return _unresolved(
                f"metadata names pack {named_pack.id!r} but none of the {len(line_items)} line "
                "items has one of its stripe_price_ids")
        if names_org:
            return _unresolved(
                f"the purchase names an organization but none of its {len(line_items)} line "
                "items has a pack's price")
        return _ignored("no line item has a pack price")
    if named_pack is None:
        return _ignored("no line item has a pack price")
    line = _line(named_pack, 1, paid_cents)
    assert line is not None
    return Purchase(Verdict.CREDIT, (line,))


def purchase_behind_charge(
    config: BillingConfig,
    *,
    payment_intent: str | None,
    session: Obj | None,
    line_items: list[Obj] | None,
    intent: Obj | None,
    charge: Obj | None,
) -> Purchase:
    """What the payment behind a refunded or disputed charge bought, when no lot holds it yet:
    the purchase rule on what Stripe holds about it. A charge that names no payment intent (so no
    Checkout session can be found) and no pack in its metadata cannot be told."""
    metadata = (session, intent, charge)
    invoice = ref_id((charge or {}).get("invoice")) or ref_id((intent or {}).get("invoice"))
    if invoice is None and payment_intent is None and pack_from(*metadata) is None:
        return _unresolved("the charge names no payment intent, so its purchase cannot be told")
    return resolve_purchase(config, metadata=metadata, invoice=invoice,
                            line_items=line_items if session is not None else None)


def purchase_key(payment_intent: str | None, session: str | None) -> str:
    """`payment:<pi>` (so every event of one payment credits once), `checkout:<cs>` without one."""
    if payment_intent:
        return f"payment:{payment_intent}"
    if session:
        return f"checkout:{session}"
    raise ValueError("a purchase names a payment intent or a Checkout session")


def line_key(base: str, index: int) -> str:
    """The ledger key of the `index`-th pack line (0-based): the purchase key itself for the
    first line, `<key>:<n>` for the n-th of a cart of several packs."""
    return base if index == 0 else f"{base}:{index + 1}"
