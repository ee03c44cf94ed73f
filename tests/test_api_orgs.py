"""The `/v1/orgs` API over HTTP against the real database: registration, balance, ledger pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from http_helpers import error_of
from httpx import ASGITransport, AsyncClient

from billing.ledger import EntryKind
from billing.runtime import Runtime
from billing.store.documents import LotTerms
from billing.store.ledger import Ledger
from starter.api.app import create_app
from starter.api.orgs import encode_cursor

AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[AsyncClient]:
    app = create_app(runtime)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://test", headers=AUTH) as c,
    ):
        yield c


def parse_utc(value: str) -> datetime:
    assert value.endswith("Z"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0)
    return parsed


async def test_register_201_then_200_and_grant_once(api: AsyncClient, org: str) -> None:
    first = await api.put(f"/v1/orgs/{org}")
    assert first.status_code == 201
    assert first.json() == {"org_id": org, "plan_id": "free", "created": True}
    again = await api.put(f"/v1/orgs/{org}")
    assert again.status_code == 200
    assert again.json() == {"org_id": org, "plan_id": "free", "created": False}
    balance = (await api.get(f"/v1/orgs/{org}/balance")).json()
    assert balance["balance"] == 500


async def test_signup_grant_in_balance_and_ledger(api: AsyncClient, org: str) -> None:
    await api.put(f"/v1/orgs/{org}")
    balance = await api.get(f"/v1/orgs/{org}/balance")
    assert balance.status_code == 200
    body = balance.json()
    assert body["org_id"] == org and body["balance"] == 500
    [lot] = body["lots"]
    assert lot == {"id": lot["id"], "kind": "grant", "units": 500, "remaining": 500,
                   "expires_at": None}

    ledger = await api.get(f"/v1/orgs/{org}/ledger")
    assert ledger.status_code == 200
    page = ledger.json()
    assert page["next_cursor"] is None
    [entry] = page["entries"]
    assert set(entry) == {"id", "kind", "amount", "key", "created_at", "lot_id", "memo"}
    assert (entry["kind"], entry["amount"], entry["key"]) == ("grant", 500, "grant:signup")
    assert entry["lot_id"] == lot["id"]
    assert isinstance(entry["memo"], str)
    parse_utc(entry["created_at"])


async def test_balance_lists_open_lots_in_draw_order(
    api: AsyncClient, org: str, ledger: Ledger, now: datetime
) -> None:
    await api.put(f"/v1/orgs/{org}")  # grant lot of 500, no expiry
    late = now + timedelta(days=300)
    soon = now + timedelta(days=30)
    await ledger.write(org, key="payment:pi_late", kind=EntryKind.TOPUP, amount=1000, now=now,
                       terms=LotTerms(expires_at=late))
    await ledger.write(org, key="payment:pi_soon", kind=EntryKind.TOPUP, amount=700, now=now,
                       terms=LotTerms(expires_at=soon))
    # Past its expiry, not yet swept: still in the balance, never drawn.
    await ledger.write(org, key="payment:pi_past", kind=EntryKind.TOPUP, amount=50, now=now,
                       terms=LotTerms(expires_at=now - timedelta(days=1)))
    # Empties the soon lot and takes 100 from the late one.
    await ledger.write(org, key="usage:r1:initial", kind=EntryKind.DEBIT, amount=-800, now=now)

    body = (await api.get(f"/v1/orgs/{org}/balance")).json()
    assert body["balance"] == 500 + 1000 + 700 + 50 - 800
    lots = body["lots"]
    assert [(lot["kind"], lot["units"], lot["remaining"]) for lot in lots] == [
        ("topup", 50, 50),
        ("topup", 1000, 900),
        ("grant", 500, 500),
    ]
    assert parse_utc(lots[1]["expires_at"]) == late
    assert sum(lot["remaining"] for lot in lots) == body["balance"]


async def test_ledger_pages_cover_every_entry_once_newest_first(
    api: AsyncClient, org: str, ledger: Ledger, now: datetime, runtime: Runtime
) -> None:
    await api.put(f"/v1/orgs/{org}")
    for i in range(7):
        await ledger.write(org, key=f"admin:req{i}", kind=EntryKind.ADJUSTMENT, amount=i + 1,
                           now=now + timedelta(minutes=i), memo=f"credit {i}")

    pages: list[list[dict[str, object]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        response = await api.get(f"/v1/orgs/{org}/ledger", params=params)
        assert response.status_code == 200
        page = response.json()
        pages.append(page["entries"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "pagination does not end"

    # 8 entries in pages of 2: the last page is full and still says there is nothing more.
    assert [len(p) for p in pages] == [2, 2, 2, 2]
    seen = [entry for p in pages for entry in p]
    stored = await runtime.db.ledger.find({"org_id": org}).sort("seq", -1).to_list()
    assert [e["id"] for e in seen] == [str(doc["_id"]) for doc in stored]
    assert len({e["id"] for e in seen}) == 8
    expected_keys = [f"admin:req{i}" for i in range(6, -1, -1)] + ["grant:signup"]
    assert [e["key"] for e in seen] == expected_keys
    assert [e["amount"] for e in seen[:7]] == [7, 6, 5, 4, 3, 2, 1]


async def test_ledger_default_limit_and_last_partial_page(
    api: AsyncClient, org: str, ledger: Ledger, now: datetime
) -> None:
    await api.put(f"/v1/orgs/{org}")
    for i in range(54):
        await ledger.write(org, key=f"usage:r{i}:initial", kind=EntryKind.DEBIT, amount=-1, now=now)
    first = (await api.get(f"/v1/orgs/{org}/ledger")).json()
    assert len(first["entries"]) == 50
    rest = (await api.get(f"/v1/orgs/{org}/ledger",
                          params={"cursor": first["next_cursor"]})).json()
    assert len(rest["entries"]) == 5 and rest["next_cursor"] is None
    assert rest["entries"][-1]["key"] == "grant:signup"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({"Authorization": "Bearer wrong-token"}, "invalid"),
        ({"Authorization": "Basic dGVzdC10b2tlbg=="}, "missing"),
    ],
)
async def test_v1_needs_the_bearer_token(
    runtime: Runtime, org: str, headers: dict[str, str], why: str
) -> None:
    app = create_app(runtime)
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as client:
        for method, path in [("PUT", f"/v1/orgs/{org}"), ("GET", f"/v1/orgs/{org}/balance"),
                             ("GET", f"/v1/orgs/{org}/ledger")]:
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            error = error_of(response)
            assert error["code"] == "UNAUTHORIZED" and why in error["message"]
    assert await runtime.db.accounts.find_one({"_id": org}) is None


@pytest.mark.parametrize("bad", ["bad!id", "a" * 65, "$where", "white space"])
async def test_invalid_org_id_is_422(api: AsyncClient, bad: str, runtime: Runtime) -> None:
    for method, path in [("PUT", f"/v1/orgs/{bad}"), ("GET", f"/v1/orgs/{bad}/balance"),
                         ("GET", f"/v1/orgs/{bad}/ledger")]:
        response = await api.request(method, path)
        assert response.status_code == 422, path
        assert error_of(response)["code"] == "INVALID_ORG_ID"
    assert await runtime.db.accounts.find_one({"_id": bad}) is None


@pytest.mark.parametrize("limit", ["0", "201", "-1", "ten"])
async def test_ledger_limit_outside_1_to_200_is_422(
    api: AsyncClient, org: str, limit: str
) -> None:
    await api.put(f"/v1/orgs/{org}")
    response = await api.get(f"/v1/orgs/{org}/ledger", params={"limit": limit})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR" and "limit" in error["message"]


@pytest.mark.parametrize(
    "cursor", ["", "not-a-cursor", "!!!", encode_cursor(5).upper(), "c2VxOi0x", "x" * 200]
)
async def test_invalid_cursor_is_422(api: AsyncClient, org: str, cursor: str) -> None:
    await api.put(f"/v1/orgs/{org}")
    response = await api.get(f"/v1/orgs/{org}/ledger", params={"cursor": cursor})
    assert response.status_code == 422
    assert error_of(response)["code"] == "INVALID_CURSOR"


async def test_unknown_org_is_404(api: AsyncClient, org: str) -> None:
    for path in [f"/v1/orgs/{org}/balance", f"/v1/orgs/{org}/ledger"]:
        response = await api.get(path)
        assert response.status_code == 404
        error = error_of(response)
        assert error["code"] == "ORG_NOT_FOUND" and org in error["message"]


async def test_bodies_above_one_mebibyte_are_refused_before_anything_is_written(
    api: AsyncClient, org: str
) -> None:
    response = await api.put(f"/v1/orgs/{org}", content=b"x" * (4 * 1024 * 1024))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"x" * (256 * 1024)

    chunked = await api.put(f"/v1/orgs/{org}", content=chunks())
    assert chunked.status_code == 413
    assert (await api.get(f"/v1/orgs/{org}/balance")).status_code == 404
    small = await api.put(f"/v1/orgs/{org}", content=b"x" * 1024)
    assert small.status_code == 201 and small.json()["created"] is True
