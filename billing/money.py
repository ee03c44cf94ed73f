"""Exact money arithmetic: integers for units and cents, `Decimal` for dollars."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation


def dollars(value: object) -> Decimal | None:
    """A dollar amount as `Decimal(str(value))`, or None when it is not a finite number.

    Going through `str` keeps what the caller wrote: `0.58` stays 0.58 instead of the binary
    float 0.57999999999999996003197111349436454474925994873046875.
    """
    if isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return amount if amount.is_finite() else None


def round_half_up_div(numerator: int, denominator: int) -> int:
    """`round_half_up(numerator / denominator)` for non-negative integers, exactly."""
    if denominator <= 0 or numerator < 0:
        raise ValueError("round_half_up_div takes a numerator >= 0 and a denominator > 0")
    return (2 * numerator + denominator) // (2 * denominator)
