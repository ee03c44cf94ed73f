"""Payloads that cross the Temporal boundary (workflow <-> activity), as pydantic models.

They live in the domain core so that workflows can use them without importing any I/O library.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field, field_validator


class ExpirePage(BaseModel):
    now: datetime
    after: str | None = None
    limit: int = 200


class ExpirePageResult(BaseModel):
    expired: int
    units: int
    next_after: str | None


# ---- admin adjustments ------------------------------------------------------------------------

ADMIN_REQUEST_ID = r"^[A-Za-z0-9_.:-]{1,64}$"


class AdminRequest(BaseModel):
    """An operator's credit (units > 0) or debit (units < 0) of an organization's extras."""

    request_id: str = Field(pattern=ADMIN_REQUEST_ID)
    org_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    units: int
    reason: str = Field(min_length=3, max_length=500)
    requested_by: str = Field(default="operator", min_length=1, max_length=128)

    @field_validator("units")
    @classmethod
    def _non_zero(cls, units: int) -> int:
        if units == 0:
            raise ValueError("an adjustment of zero units changes nothing")
        return units

    @field_validator("reason")
    @classmethod
    def _reason(cls, reason: str) -> str:
        if len(reason.strip()) < 3:
            raise ValueError("a reason of at least 3 characters is required")
        return reason.strip()


class Decision(BaseModel):
    """An `approve` or `reject` signal from a second operator."""

    by: str = Field(default="operator", min_length=1, max_length=128)
    note: str = ""


class AdminPosting(BaseModel):
    request: AdminRequest
    approved_by: str | None = None


class AdminPosted(BaseModel):
    applied: bool
    entry_id: str | None
    balance: int


class AdminResult(BaseModel):
    request_id: str
    status: str  # applied | duplicate | rejected
    units: int
    balance: int | None = None
    approved_by: str | None = None
    rejected_by: str | None = None
    note: str = ""
