"""Usage and the weekly meter: `POST /v1/usage` (and its batch), the meter, the quota gate and
notifications.

Usage is recorded straight into MongoDB (one transaction per record, no workflow): it is the hot
path of the engine.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from billing.clock import utcnow
from billing.errors import BillingError
from billing.metering import UsageRequest
from billing.metrics import USAGE_BATCH_SECONDS, USAGE_RECORD_SECONDS
from billing.store.meter_writes import UsageResult
from billing.store.meters import Meters
from billing.store.notifications import feed
from starter.api.deps import RuntimeDep, StateDep, v1_router
from starter.api.errors import ErrorBody, ErrorResponse

#: The largest `seq` a query can name: a BSON 64-bit integer (larger ones are a 422).
SEQ_MAX = 2**63 - 1

router = v1_router(
    tags=["metering"],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        404: {"model": ErrorResponse, "description": "organization not registered"},
        422: {"model": ErrorResponse, "description": "invalid body, organization id or parameter"},
    },
)


async def meters(state: StateDep) -> Meters:
    """The process's one `Meters` (it queues each organization's records in this process)."""
    return state.runtime.meters


MetersDep = Annotated[Meters, Depends(meters)]


class MeterResponse(BaseModel):
    org_id: str
    week: str
    used: int
    quota: int
    plan_id: str
    remaining: int = Field(description="the week's quota left once every active hold is used")
    held: int = Field(description="units reserved by active balance holds")


class QuotaResponse(BaseModel):
    allowed: bool
    remaining: int = Field(description="`max(0, quota - used) + balance - held`")
    reason: str | None
    held: int = Field(description="units reserved by active balance holds")


class Notification(BaseModel):
    id: str
    seq: int
    type: str
    key: str
    payload: dict[str, Any]
    created_at: datetime


class NotificationsResponse(BaseModel):
    notifications: list[Notification]
    next_after: int | None


@router.post("/usage", response_model=UsageResult, summary="Record one usage record")
async def record_usage(body: UsageRequest, store: MetersDep) -> UsageResult:
    """Counts the record against this ISO week and debits what exceeds the quota from extras.
    Recording the same `(org_id, run_id, step)` again returns the first result with
    `applied: false`. With `hold_id`, the record settles that balance hold in the same
    transaction (usage is never refused for a hold)."""
    started = time.perf_counter()
    result = await store.record(body, utcnow())
    USAGE_RECORD_SECONDS.labels(str(result.applied).lower()).observe(time.perf_counter() - started)
    return result


MAX_BATCH = 1000


class UsageBatch(BaseModel):
    """`POST /v1/usage/batch`: 1 to 1000 records, each a `POST /v1/usage` body."""

    model_config = ConfigDict(extra="forbid")

    records: list[Any] = Field(min_length=1, max_length=MAX_BATCH)


class RecordError(BaseModel):
    error: ErrorBody


class UsageBatchResult(BaseModel):
    results: list[UsageResult | RecordError]


def _invalid(exc: ValidationError) -> RecordError:
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}"
                        for e in exc.errors())
    return RecordError(error=ErrorBody(code="VALIDATION_ERROR", message=message))


@router.post("/usage/batch", response_model=UsageBatchResult,
             summary="Record up to 1000 usage records")
async def record_usage_batch(body: UsageBatch, store: MetersDep) -> UsageBatchResult:
    """One result per record, in order: what `POST /v1/usage` would answer for it, or the error
    that refused it (the others still apply). Each record keeps its own idempotency, so sending
    the same batch again replays every record with `applied: false`."""
    started = time.perf_counter()
    results: list[UsageResult | RecordError | None] = []
    valid: list[tuple[int, UsageRequest]] = []
    for index, raw in enumerate(body.records):
        try:
            valid.append((index, UsageRequest.model_validate(raw)))
            results.append(None)
        except ValidationError as exc:
            results.append(_invalid(exc))
    recorded = await store.record_many([request for _, request in valid], utcnow())
    for (index, _), outcome in zip(valid, recorded, strict=True):
        if isinstance(outcome, BillingError):
            results[index] = RecordError(error=ErrorBody(code=outcome.code,
                                                         message=outcome.message))
        else:
            results[index] = outcome
    USAGE_BATCH_SECONDS.observe(time.perf_counter() - started)
    return UsageBatchResult(results=[r for r in results if r is not None])


@router.get("/orgs/{org}/meter", response_model=MeterResponse, summary="This week's meter")
async def meter(org: str, store: MetersDep) -> MeterResponse:
    view = await store.current(org, utcnow())
    return MeterResponse(org_id=view.org_id, week=view.week, used=view.used, quota=view.quota,
                         plan_id=view.plan_id, remaining=view.remaining, held=view.held)


@router.get("/orgs/{org}/quota", response_model=QuotaResponse, summary="May this org run more?")
async def quota(org: str, store: MetersDep) -> QuotaResponse:
    """`remaining = max(0, quota - used) + balance - held`, where `held` is what active balance
    holds reserve; `reason` is `METER_EXHAUSTED` or `PAYMENT_PAST_DUE` when `allowed` is
    false."""
    gate = await store.gate(org, utcnow())
    return QuotaResponse(allowed=gate.allowed, remaining=gate.remaining, reason=gate.reason,
                         held=gate.held)


@router.get("/orgs/{org}/notifications", response_model=NotificationsResponse,
            summary="Notifications, oldest first, after a sequence number")
async def notifications(
    org: str, runtime: RuntimeDep, after: Annotated[int, Query(ge=0, le=SEQ_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
) -> NotificationsResponse:
    """Every notification has a per-organization `seq` without gaps: keep `next_after` (or the
    last `seq` read) and ask again with `after=` it, and no notification is ever missed.
    `next_after` is null at the end of the feed."""
    await runtime.accounts.get(org)
    docs, next_after = await feed(runtime.db, org, after=after, limit=limit)
    return NotificationsResponse(
        notifications=[
            Notification(id=str(doc["_id"]), seq=doc["seq"], type=doc["type"], key=doc["key"],
                         payload=doc["payload"], created_at=doc["created_at"])
            for doc in docs
        ],
        next_after=next_after,
    )
