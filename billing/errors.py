"""Domain errors with stable codes; the HTTP layer maps them to the error format of SPEC §7."""

from __future__ import annotations


class BillingError(Exception):
    """An error the caller can act on: a stable `code`, a message and an HTTP status."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


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
