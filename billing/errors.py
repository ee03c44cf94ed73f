"""Domain errors with stable codes; the HTTP layer maps them to the error format of SPEC §7."""

from __future__ import annotations

from typing import Any


class BillingError(Exception):
    """An error the caller can act on: a stable `code`, a message and an HTTP status."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def details(self) -> dict[str, Any]:
        """Fields the error body carries beside `code` and `message`."""
        return {}


class OrgNotFound(BillingError):
    status = 404
    code = "ORG_NOT_FOUND"

    def __init__(self, org_id: str) -> None:
        super().__init__(f"organization {org_id!r} is not registered")
        self.org_id = org_id


class InvalidInput(BillingError):
    status = 422
    code = "INVALID_INPUT"


class NotFound(BillingError):
    status = 404
    code = "NOT_FOUND"


class HoldRefused(BillingError):
    """A balance hold refused (SPEC §5.11): `INSUFFICIENT_UNITS` or `PAYMENT_PAST_DUE`, with
    what the organization has left."""

    status = 409

    def __init__(self, code: str, remaining: int) -> None:
        reason = ("the organization's remaining does not cover the hold"
                  if code == "INSUFFICIENT_UNITS" else "a payment is past due beyond its grace")
        super().__init__(f"{reason} (remaining {remaining} units)", code=code)
        self.remaining = remaining

    def details(self) -> dict[str, Any]:
        return {"remaining": self.remaining}
