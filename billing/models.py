"""Payloads that cross the Temporal boundary (workflow <-> activity), as pydantic models.

They live in the domain core so that workflows can use them without importing any I/O library.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

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


# ---- Stripe events (SPEC §5.5, §6) ------------------------------------------------------------

StripeOutcomeKind = Literal["applied", "duplicate", "stale", "ignored", "unresolved"]


class StripeEvent(BaseModel):
    """A verified Stripe event as the webhook receiver passes it to `StripeEventWorkflow`."""

    id: str
    type: str
    created: int
    object: dict[str, Any]
    livemode: bool = False


class StripeApply(BaseModel):
    """One event's effect to apply, with what the workflow read from Stripe to resolve it."""

    event: StripeEvent
    now: datetime
    org_id: str | None = None
    pack_id: str | None = None
    line_items: list[dict[str, Any]] | None = None
    subscription: dict[str, Any] | None = None
    refunds: list[dict[str, Any]] | None = None
    payment_intent: str | None = None  # behind a disputed charge, when the payload lacks it
    outcome: StripeOutcomeKind | None = None  # for `record_stripe_outcome` only
    reason: str | None = None


class StripeEventOutcome(BaseModel):
    """What an event did: the workflow's result and the `stripe_events` record."""

    event_id: str
    type: str
    outcome: StripeOutcomeKind
    org_id: str | None = None
    reason: str | None = None
    written: list[str] = Field(default_factory=list)


class SubscriptionState(BaseModel):
    org_id: str | None
    status: str


class DunningPage(BaseModel):
    now: datetime
    after: str | None = None
    limit: int = 200


class DunningPageResult(BaseModel):
    unpaid: int
    next_after: str | None


# ---- weekly reset (SPEC §5.3) -------------------------------------------------------------------

WEEK_PATTERN = r"^\d{4}-W\d{2}$"


class WeeklyResetInput(BaseModel):
    """The sweep's input; the schedule passes none. Totals are carried across continue-as-new."""

    #: Default: the ISO week in which the sweep starts.
    week: str | None = Field(default=None, pattern=WEEK_PATTERN)
    after: str | None = None
    page_size: int = Field(default=200, ge=1, le=1000)
    concurrency: int = Field(default=20, ge=1, le=100)
    pages_per_run: int = Field(default=25, ge=1)
    orgs: int = 0
    settled_units: int = 0
    skipped: int = 0
    failed: list[str] = Field(default_factory=list)


class WeeklyResetResult(BaseModel):
    week: str
    orgs: int
    settled_units: int
    skipped: int
    failed: list[str]


class ResetPage(BaseModel):
    after: str | None = None
    limit: int = 200


class ResetPageResult(BaseModel):
    org_ids: list[str]
    next_after: str | None


class ResetOrg(BaseModel):
    org_id: str
    week: str = Field(pattern=WEEK_PATTERN)
    now: datetime


class ResetOrgResult(BaseModel):
    org_id: str
    week: str
    applied: bool
    settled: int
    used: int
    quota: int
