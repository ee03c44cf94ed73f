"""Balance holds (SPEC §5.11): reserve units before an expensive run, settle them with its usage
record (`hold_id`), release them when the run fails; they expire by themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, Field

from billing.clock import utcnow
from billing.errors import HoldRefused
from billing.holds import Hold, HoldRequest
from billing.metering import RUN_ID_PATTERN
from billing.store import holds
from starter.api.deps import RuntimeDep, v1_router
from starter.api.errors import ErrorBody, ErrorResponse
from starter.api.metering import MetersDep

router = v1_router(
    tags=["holds"],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        404: {"model": ErrorResponse, "description": "organization not registered"},
        422: {"model": ErrorResponse, "description": "invalid body, organization or hold id"},
    },
)


class RefusedBody(ErrorBody):
    remaining: int = Field(description="the organization's remaining, net of its active holds")


class RefusedResponse(BaseModel):
    error: RefusedBody


REFUSED: dict[int | str, dict[str, Any]] = {
    409: {"model": RefusedResponse,
          "description": "INSUFFICIENT_UNITS: the remaining, net of the active holds, does not "
                         "cover the hold; PAYMENT_PAST_DUE: a payment is past due beyond its "
                         "grace (as the quota gate)"},
}


class HoldResponse(BaseModel):
    hold_id: str
    units: int = Field(description="units reserved")
    expires_at: datetime = Field(description="when the hold stops counting by itself")
    remaining: int = Field(description="the organization's remaining once this hold is granted")


class ActiveHold(BaseModel):
    hold_id: str
    units: int = Field(description="units reserved")
    expires_at: datetime = Field(description="when the hold stops counting by itself")


class HoldsResponse(BaseModel):
    holds: list[ActiveHold] = Field(description="active holds, soonest expiry first")


class ReleaseResponse(BaseModel):
    hold_id: str
    released: bool = Field(description="false when the hold was already settled, released or "
                                       "expired (nothing changed)")


@router.post("/orgs/{org}/holds", status_code=201, response_model=HoldResponse,
             summary="Reserve units before a run", responses=REFUSED)
async def create_hold(org: str, body: HoldRequest, store: MetersDep) -> HoldResponse:
    """Granted when the quota gate's `remaining`, less every active hold, covers `units` (or
    what `costs` would meter as usage; neither: one run's base units). The same `hold_id`
    again answers the first answer; a refused hold writes nothing."""
    decided = await store.hold(org, body, utcnow())
    if not isinstance(decided, Hold):
        raise HoldRefused(decided.code, decided.remaining)
    return HoldResponse(hold_id=decided.hold_id, units=decided.units,
                        expires_at=decided.expires_at, remaining=decided.remaining)


async def active(org: str, runtime: RuntimeDep) -> HoldsResponse:
    """The organization's active holds (`GET /v1/orgs/{org}/holds`, `billing holds`)."""
    await runtime.accounts.get(org)
    found = await holds.active_in(runtime.db, org, utcnow())
    return HoldsResponse(holds=[ActiveHold(hold_id=h.hold_id, units=h.units,
                                           expires_at=h.expires_at) for h in found])


@router.get("/orgs/{org}/holds", response_model=HoldsResponse, summary="Active holds")
async def list_holds(org: str, runtime: RuntimeDep) -> HoldsResponse:
    """Holds neither settled, released nor expired."""
    return await active(org, runtime)


@router.delete("/orgs/{org}/holds/{hold_id}", response_model=ReleaseResponse,
               summary="Release a hold", responses={
                   404: {"model": ErrorResponse,
                         "description": "ORG_NOT_FOUND, or HOLD_NOT_FOUND: no such hold"}})
async def release_hold(org: str, hold_id: Annotated[str, Path(pattern=RUN_ID_PATTERN)],
                       runtime: RuntimeDep) -> ReleaseResponse:
    """The hold stops counting at once (a run that failed). Releasing twice, or a hold already
    settled or expired, changes nothing."""
    await runtime.accounts.get(org)
    return ReleaseResponse(hold_id=hold_id,
                           released=await holds.release(runtime.db, org, hold_id, utcnow()))
