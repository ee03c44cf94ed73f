"""`/v1/orgs/{org}`: registration, balance with open lots, and the ledger newest first."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query, Response, status
from pydantic import BaseModel

from billing.clock import utcnow
from billing.errors import InvalidInput
from billing.ledger import OpenLot, drawable
from billing.store.database import Doc
from starter.api.deps import RuntimeDep, v1_router
from starter.api.errors import ErrorResponse

router = v1_router(
    tags=["organizations"],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        422: {"model": ErrorResponse, "description": "invalid organization id or parameter"},
    },
)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "organization not registered"},
}


class Registration(BaseModel):
    org_id: str
    plan_id: str
    created: bool


class Lot(BaseModel):
    id: str
    kind: str
    units: int
    remaining: int
    expires_at: datetime | None


class Balance(BaseModel):
    org_id: str
    balance: int
    lots: list[Lot]


class Entry(BaseModel):
    id: str
    kind: str
    amount: int
    key: str
    created_at: datetime
    lot_id: str | None
    memo: str


class LedgerPage(BaseModel):
    entries: list[Entry]
    next_cursor: str | None


@router.put(
    "/orgs/{org}",
    response_model=Registration,
    status_code=status.HTTP_200_OK,
    summary="Register an organization (idempotent)",
    responses={201: {"model": Registration, "description": "registered now"}},
)
async def register(org: str, runtime: RuntimeDep, response: Response) -> Registration:
    """Creates the account on the default plan and writes its signup grant once: 201 when it is
    created, 200 when it already existed."""
    registration = await runtime.accounts.register(org, utcnow())
    if registration.created:
        response.status_code = status.HTTP_201_CREATED
    return Registration(
        org_id=registration.org_id, plan_id=registration.plan_id, created=registration.created
    )


_BEFORE_ANY_EXPIRY = datetime.min.replace(tzinfo=UTC)


def _draw_order(lots: list[Doc]) -> list[Doc]:
    """Open lots in the order debits take them (`billing.ledger.drawable`). Lots already past
    expiry but not yet swept still count in the balance: they are listed too, first."""
    by_id = {lot["_id"]: lot for lot in lots}
    ordered = drawable(
        [
            OpenLot(id=lot["_id"], remaining=lot["remaining"], expires_at=lot.get("expires_at"),
                    seq=lot["seq"])
            for lot in lots
        ],
        _BEFORE_ANY_EXPIRY,
    )
    return [by_id[lot.id] for lot in ordered]


@router.get(
    "/orgs/{org}/balance", response_model=Balance, summary="Balance and open lots",
    responses=NOT_FOUND,
)
async def balance(org: str, runtime: RuntimeDep) -> Balance:
    account = await runtime.accounts.get(org)
    lots = _draw_order(await runtime.ledger.lots(org, open_only=True))
    return Balance(
        org_id=org,
        balance=account["balance"],
        lots=[
            Lot(id=lot["_id"], kind=lot["kind"], units=lot["units"], remaining=lot["remaining"],
                expires_at=lot.get("expires_at"))
            for lot in lots
        ],
    )


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The entry `seq` a page continues below; anything else is `INVALID_CURSOR`."""
    invalid = InvalidInput("cursor is not one this API returned", code="INVALID_CURSOR")
    if len(cursor) > 64:
        raise invalid
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise invalid from exc
    prefix, _, digits = text.partition(":")
    if prefix != "seq" or not digits.isdigit() or len(digits) > 18:
        raise invalid
    return int(digits)


@router.get(
    "/orgs/{org}/ledger", response_model=LedgerPage, summary="Ledger entries, newest first",
    responses=NOT_FOUND,
)
async def ledger(
    org: str,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> LedgerPage:
    """Pages by the entry sequence: pass `next_cursor` back as `cursor`; it is null on the last
    page. Entries written while paging appear at the top of a new first page, never twice."""
    before = decode_cursor(cursor) if cursor is not None else None
    await runtime.accounts.get(org)
    docs = await runtime.ledger.entries(org, limit=limit + 1, before_seq=before)
    page = docs[:limit]
    return LedgerPage(
        entries=[
            Entry(id=str(doc["_id"]), kind=doc["kind"], amount=doc["amount"], key=doc["key"],
                  created_at=doc["created_at"], lot_id=doc.get("lot_id"), memo=doc.get("memo", ""))
            for doc in page
        ],
        next_cursor=encode_cursor(page[-1]["seq"]) if len(docs) > limit else None,
    )
