"""Payloads that cross the Temporal boundary (workflow <-> activity), as pydantic models.

They live in the domain core so that workflows can use them without importing any I/O library.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


class ExpirePageResult(BaseModel):
    expired: int
    units: int
    next_after: str | None
    failed: list[str] = Field(default_factory=list)


class SweepPage(BaseModel):
    """Which page of organizations a daily sweep asks for."""

    now: datetime
    after: str | None = None
    limit: int = 200


class OrgPage(BaseModel):
    """One page of the organizations a daily sweep has work for."""

    org_ids: list[str]
    next_after: str | None


class OrgSweep(BaseModel):
    """One organization's part of a daily sweep (`OrgSweepWorkflow`): the activity that does it,
    run with the usual retries, failing visibly for that organization only."""

    sweep: str  # expire | dunning
    org_id: str
    now: datetime


class OrgSweepResult(BaseModel):
    org_id: str
    changed: int  # lots expired, or subscriptions marked unpaid
    units: int = 0


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


class DecisionRequest(Decision):
    """The `decide` update: approve (or reject) an adjustment waiting for a second operator."""

    approve: bool


class RefusedDecision(BaseModel):
    """A decision the workflow refused (a self-approval, or one for a request that waits for
    none), kept so that a refused signal is never dropped silently."""

    action: str
    by: str
    reason: str


class AdjustmentStatus(BaseModel):
    """The `status` query of an adjustment: where it stands and the decisions it refused."""

    request: AdminRequest
    phase: str  # checking | waiting | deciding | done
    approved_by: str | None
    rejected_by: str | None
    refused: list[RefusedDecision]


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


#: Stripe's ids are `evt_` and letters; the bound keeps the workflow id `stripe-<id>` within
#: Temporal's limit and readable at `GET /v1/stripe-events/{id}`.
STRIPE_EVENT_ID = r"^[A-Za-z0-9_.:-]{1,255}$"
#: 9999-12-31T23:59:59Z, the last second a `datetime` holds.
MAX_UNIX_TIME = 253_402_300_799


class StripeEvent(BaseModel):
    """A verified Stripe event as the webhook receiver passes it to `StripeEventWorkflow`."""

    id: str = Field(pattern=STRIPE_EVENT_ID)
    type: str
    created: int = Field(ge=0, le=MAX_UNIX_TIME)
    object: dict[str, Any]
    livemode: bool = False

    @classmethod
    def from_stripe(cls, data: Any) -> StripeEvent:
        """The event envelope Stripe sends or lists (`data.object` inside); raises `ValueError`
        (a pydantic `ValidationError`) when it does not have that shape."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            raise ValueError("an event is an object with an object `data`")
        return cls.model_validate(
            {"id": data.get("id"), "type": data.get("type"), "created": data.get("created"),
             "object": data["data"].get("object"), "livemode": data.get("livemode") is True},
            strict=True,
        )


class StripeReplay(BaseModel):
    """Input of a `StripeEventWorkflow` run that retrieves its event from Stripe first
    (`billing replay`, or `temporal workflow start --input '{"event_id": "evt_..."}'`)."""

    event_id: str = Field(pattern=r"^evt_[A-Za-z0-9_]{1,250}$")


class PurchaseFacts(BaseModel):
    """What Stripe holds about the payment behind an event: the Checkout session that took it
    (with its line items), the payment intent and the charge, as far as they exist."""

    payment_intent: str | None = None
    session: dict[str, Any] | None = None
    line_items: list[dict[str, Any]] | None = None
    intent: dict[str, Any] | None = None
    charge: dict[str, Any] | None = None


class PurchaseQuery(BaseModel):
    """Which payment to read the purchase of (`stripe_purchase_facts`): its payment intent, and
    the charge when the event carries it."""

    payment_intent: str | None = None
    charge: dict[str, Any] | None = None


class StripeApply(BaseModel):
    """One event's effect to apply, with what the workflow read from Stripe to resolve it."""

    event: StripeEvent
    now: datetime
    org_id: str | None = None
    purchase: PurchaseFacts | None = None
    subscription: dict[str, Any] | None = None
    refunds: list[dict[str, Any]] | None = None
    payment_intent: str | None = None  # behind a disputed charge, when the payload lacks it
    #: The run's first guess of the organization (`stripe_resolve_org`: the lots, a known
    #: subscription, the customer link), for its `OrgId`; never above what the apply
    #: activity finds in metadata (SPEC §5.5), only used when nothing decides.
    org_guess: str | None = None
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


class StripeStep(BaseModel):
    """An apply activity's answer: the recorded outcome, or (nothing written) what the workflow
    must get first: the purchase behind a charge read from Stripe (`needs_purchase`), or a
    purchase still to be credited (`waiting_for`)."""

    outcome: StripeEventOutcome | None = None
    needs_purchase: bool = False
    waiting_for: str | None = None


class OrgRef(BaseModel):
    """The organization an event concerns, as far as the engine can tell before applying it."""

    org_id: str | None


class SubscriptionState(BaseModel):
    """The organization an invoice belongs to and its subscription's status (None: the engine
    does not know that subscription)."""

    org_id: str | None
    status: str | None


class DunningPageResult(BaseModel):
    unpaid: int
    next_after: str | None
    failed: list[str] = Field(default_factory=list)


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


# ---- reconciliation (SPEC §6) -------------------------------------------------------------------

ReconcileCheck = Literal["ledger", "meter", "subscription"]


class Divergence(BaseModel):
    """One disagreement found by the reconciliation; reported, never fixed by it."""

    org_id: str
    check: ReconcileCheck
    #: What disagrees: `balance_vs_entries`, `lot_remaining`, `balance_vs_lots`,
    #: `overflow_vs_debits`, `status`, `plan`, `plan_unresolved`, `missing_in_stripe`.
    kind: str
    #: The lot, week or Stripe subscription the divergence is about.
    subject: str
    expected: int | str | None
    actual: int | str | None
    detail: str = ""


class ReconcilePage(BaseModel):
    after: str | None = None
    limit: int = 200
    week: str = Field(pattern=WEEK_PATTERN)
    report_id: str
    started_at: datetime


class SubscriptionRef(BaseModel):
    """What the engine believes about an organization's Stripe subscription."""

    org_id: str
    subscription_id: str
    status: str
    plan_id: str | None


class SubscriptionCheck(BaseModel):
    ref: SubscriptionRef
    report_id: str
    started_at: datetime


class ReconcilePageResult(BaseModel):
    org_ids: list[str]
    divergences: list[Divergence]
    subscriptions: list[SubscriptionRef]
    next_after: str | None


class LedgerSums(BaseModel):
    """Running sums over one organization's ledger entries with `seq <= through_seq`.

    Entries are immutable and an organization's `seq` grows with every ledger transaction, so
    sums up to a `seq` never change: the reconciliation adds them up in bounded chunks and
    carries them in its heartbeat, and only the entries after `through_seq` are read in the
    final snapshot."""

    org_id: str
    through_seq: int = 0
    entries_total: int = 0
    #: Units drawn from each lot, by lot id.
    drawn: dict[str, int] = Field(default_factory=dict)
    #: The checked week's usage debits (`debit` entries keyed `usage:*`), as positive units.
    week_usage_debits: int = 0


class PageProgress(BaseModel):
    """How far `reconcile_org_page` got: its heartbeat details, from which a retry resumes."""

    #: Organizations of the page done so far (checked, divergences notified).
    done: int = 0
    #: The page, as the first attempt read it.
    org_ids: list[str]
    #: The organization in progress, summed through a chunk of its ledger.
    current: LedgerSums | None = None
    #: What the done organizations gave (an organization without an account gives nothing).
    checked: list[str] = Field(default_factory=list)
    divergences: list[Divergence] = Field(default_factory=list)
    subscriptions: list[SubscriptionRef] = Field(default_factory=list)


class EventListQuery(BaseModel):
    """One page of `GET /v1/events`, newest first."""

    created_gte: int
    types: list[str]
    starting_after: str | None = None
    limit: int = Field(default=100, ge=1, le=100)


class StripeEventPage(BaseModel):
    events: list[StripeEvent]
    has_more: bool

    @property
    def last_id(self) -> str | None:
        return self.events[-1].id if self.events else None


class MissedEventsPage(BaseModel):
    """The events of one listed page that the engine never applied."""

    listed: int
    missed: list[StripeEvent]
    next_after: str | None


class RepairedEvent(BaseModel):
    event_id: str
    type: str
    outcome: str  # the StripeEventWorkflow outcome, or `failed`


class ReconcileCounts(BaseModel):
    orgs: int = 0
    ledger_divergent: int = 0
    meter_divergent: int = 0
    subscriptions_checked: int = 0
    subscription_divergent: int = 0
    subscriptions_unverified: int = 0
    events_listed: int = 0
    events_missed: int = 0
    events_repaired: int = 0
    events_already_started: int = 0
    events_failed: int = 0


#: The report keeps this many divergences and repaired events (every divergence is also a
#: notification of its organization; the counts count them all).
REPORT_LIST_CAP = 1000


class ReconcileReport(BaseModel):
    """The `reports` document a reconciliation writes (`_id` = `report_id`)."""

    report_id: str
    kind: Literal["reconcile"] = "reconcile"
    started_at: datetime
    finished_at: datetime | None = None
    week: str = Field(pattern=WEEK_PATTERN)
    events_since: datetime
    counts: ReconcileCounts = Field(default_factory=ReconcileCounts)
    divergences: list[Divergence] = Field(default_factory=list)
    divergences_total: int = 0
    repaired_events: list[RepairedEvent] = Field(default_factory=list)
    #: Why the missed-events check stopped early (Stripe unreachable or refusing), if it did.
    events_error: str | None = None


class ReconcileInput(BaseModel):
    """The sweep's input; the schedule passes none. The report in progress is carried across
    continue-as-new."""

    #: Default: the ISO week in which the sweep starts.
    week: str | None = Field(default=None, pattern=WEEK_PATTERN)
    events_window_hours: int = Field(default=72, ge=1, le=720)
    events_page_size: int = Field(default=100, ge=1, le=100)
    page_size: int = Field(default=200, ge=1, le=1000)
    concurrency: int = Field(default=10, ge=1, le=100)
    pages_per_run: int = Field(default=10, ge=1)
    phase: Literal["orgs", "events"] = "orgs"
    after: str | None = None
    events_after: str | None = None
    report: ReconcileReport | None = None


class AutoTopUpOrder(BaseModel):
    """What `AutoTopUpWorkflow` buys; `trigger_id` is its workflow id, `auto-topup-<org>-<n>`."""

    trigger_id: str
    org_id: str
    pack_id: str


class AutoTopUpCharge(BaseModel):
    """Stripe's answer to the off-session PaymentIntent of a top-up."""

    order: AutoTopUpOrder
    succeeded: bool
    payment_intent: str | None = None
    intent: dict[str, Any] | None = None  # the PaymentIntent when it succeeded
    reason: str | None = None  # the decline code or the status when it did not


class AutoTopUpResult(BaseModel):
    trigger_id: str
    outcome: Literal["succeeded", "failed"]
    payment_intent: str | None = None
    credited_units: int = 0
    paused: bool = False
    reason: str | None = None
