"""How domain errors cross into Temporal: a `BillingError` is bad input that no retry can fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from temporalio.exceptions import ApplicationError

from billing.errors import BillingError


@contextmanager
def final_on_bad_input() -> Iterator[None]:
    """Turn a `BillingError` into a non-retryable `ApplicationError` typed with its code."""
    try:
        yield
    except BillingError as exc:
        raise ApplicationError(exc.message, type=exc.code, non_retryable=True) from exc
