"""`/v1/orgs/{org}/auto-topup`: the automatic top-up settings of an organization (SPEC §5.8)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from billing.auto_topup import AutoTopUp
from billing.clock import utcnow
from billing.runtime import Runtime
from billing.store.auto_topups import view
from starter.api.deps import RuntimeDep, v1_router
from starter.api.errors import ErrorResponse

router = v1_router(
    tags=["organizations"],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        404: {"model": ErrorResponse, "description": "organization not registered"},
        422: {"model": ErrorResponse,
              "description": "invalid body or organization id, or an unknown pack"},
    },
)

CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse,
          "description": "NO_PAYMENT_METHOD: no linked Stripe customer to charge"},
}


class AutoTopUpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool
    pack_id: str = Field(min_length=1, max_length=64)
    below_units: int = Field(ge=0, le=2**63 - 1)
    max_per_month: int = Field(ge=0, le=10_000)


class AutoTopUpView(BaseModel):
    enabled: bool
    pack_id: str | None
    below_units: int
    max_per_month: int
    paused: bool
    this_month: int


def _settings(state: AutoTopUp) -> AutoTopUpSettings:
    return AutoTopUpSettings(enabled=state.enabled, pack_id=state.pack_id or "",
                             below_units=state.below_units, max_per_month=state.max_per_month)


async def configure(org: str, body: AutoTopUpSettings, runtime: Runtime) -> AutoTopUpSettings:
    await runtime.accounts.get(org)
    stored = await runtime.auto_topups.configure(
        org, enabled=body.enabled, pack_id=body.pack_id, below_units=body.below_units,
        max_per_month=body.max_per_month)
    return _settings(stored)


async def read(org: str, runtime: Runtime) -> AutoTopUpView:
    await runtime.accounts.get(org)
    state = await runtime.auto_topups.get(org)
    return AutoTopUpView(**view(state, utcnow()))


@router.put("/orgs/{org}/auto-topup", response_model=AutoTopUpSettings,
            summary="Set automatic top-up", responses=CONFLICT)
async def put_auto_topup(org: str, body: AutoTopUpSettings,
                         runtime: RuntimeDep) -> AutoTopUpSettings:
    """Stores the settings and answers them. Enabling needs a linked Stripe customer and clears
    a pause (three failed top-ups in a row); a top-up starts at the next write that lowers the
    balance below `below_units`."""
    return await configure(org, body, runtime)


@router.get("/orgs/{org}/auto-topup", response_model=AutoTopUpView,
            summary="Automatic top-up settings and state")
async def get_auto_topup(org: str, runtime: RuntimeDep) -> AutoTopUpView:
    """The settings, whether auto top-up is paused, and the top-ups of this calendar month (UTC)
    that succeeded or are in flight."""
    return await read(org, runtime)
