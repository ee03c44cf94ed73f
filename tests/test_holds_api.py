"""Balance holds over HTTP (SPEC §5.11) on the real database: grant, replay, settle with usage,
release, expire, the gate and meter's `held`, refusals, and twenty concurrent holds through one
API process and through two `billing serve` processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from faults import app_client, serving, worker_env
from http_helpers import error_of
from meter_helpers import subscribed
from temporalio.client import Client

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.runtime import Runtime
from billing.store.database import Database

HOLD_FIELDS = {"hold_id", "units", "expires_at", "remaining"}


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app in this process (holds need no Temporal)."""
    async with app_client(runtime, None) as api:
        yield api


async def registered(api: httpx.AsyncClient, org: str) -> None:
    """A new organization on the free plan: quota 0, the 500-unit signup grant."""
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201


async def quota(api: httpx.AsyncClient, org: str) -> dict[str, Any]:
    response = await api.get(f"/v1/orgs/{org}/quota")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def active(api: httpx.AsyncClient, org: str) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/orgs/{org}/holds")
    assert response.status_code == 200, response.text
    return list(response.json()["holds"])


async def test_a_hold_reserves_units_until_its_usage_settles_it(
    client: httpx.AsyncClient, org: str, db: Database
) -> None:
    await registered(client, org)
    before = utcnow()
    first = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "run-1", "units": 75})
    assert first.status_code == 201, first.text
    body = first.json()
    assert set(body) == HOLD_FIELDS
    assert (body["hold_id"], body["units"], body["remaining"]) == ("run-1", 75, 425)
    expires = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(seconds=900) <= expires <= utcnow() + timedelta(seconds=900)
    again = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "run-1", "units": 5})
    assert (again.status_code, again.json()) == (201, body)  # the first answer
    assert await quota(client, org) == {"allowed": True, "remaining": 425, "reason": None,
                                        "held": 75}
    meter = (await client.get(f"/v1/orgs/{org}/meter")).json()
    assert (meter["held"], meter["remaining"]) == (75, 0)
    assert await active(client, org) == [{"hold_id": "run-1", "units": 75,
                                          "expires_at": body["expires_at"]}]

    used = await client.post("/v1/usage", json={"org_id": org, "run_id": "run-1", "units": 60,
                                                "hold_id": "run-1"})
    assert used.status_code == 200, used.text
    assert (used.json()["applied"], used.json()["balance"]) == (True, 440)
    assert await quota(client, org) == {"allowed": True, "remaining": 440, "reason": None,
                                        "held": 0}
    assert await active(client, org) == []
    stored = await db.holds.find_one({"_id": f"{org}/run-1"})
    assert stored is not None and stored["remaining"] == 425  # the grant's record stays
    # settling again (a replay, another step naming the hold) changes nothing but the count
    replay = await client.post("/v1/usage", json={"org_id": org, "run_id": "run-1",
                                                  "units": 60, "hold_id": "run-1"})
    assert replay.json() == {**used.json(), "applied": False}
    step = await client.post("/v1/usage", json={"org_id": org, "run_id": "run-1",
                                                "step": "retry", "units": 5, "hold_id": "run-1"})
    assert step.json()["balance"] == 435
    assert await db.holds.find_one({"_id": f"{org}/run-1"}) == stored
    assert await active(client, org) == []
    released = await client.delete(f"/v1/orgs/{org}/holds/run-1")
    assert released.json() == {"hold_id": "run-1", "released": False}
    assert (await quota(client, org))["remaining"] == 435


async def test_release_expiry_and_costs(client: httpx.AsyncClient, org: str) -> None:
    await registered(client, org)
    hold = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "a", "units": 100})
    assert hold.json()["remaining"] == 400
    assert (await client.delete(f"/v1/orgs/{org}/holds/a")).json() == {"hold_id": "a",
                                                                       "released": True}
    assert (await client.delete(f"/v1/orgs/{org}/holds/a")).json()["released"] is False
    assert (await quota(client, org))["held"] == 0
    # a released hold id answers its first answer, it does not hold again
    assert (await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "a", "units": 1})
            ).json() == hold.json()
    assert (await quota(client, org))["held"] == 0

    # costs are priced as usage: free plan, ratio 1 -> 12 + 2 units
    priced = await client.post(f"/v1/orgs/{org}/holds", json={
        "hold_id": "b", "costs": {"llm": 0.0123, "search": 0.002}, "ttl_seconds": 1})
    assert (priced.status_code, priced.json()["units"]) == (201, 14)
    assert (await quota(client, org))["held"] == 14
    await asyncio.sleep(1.1)  # expires by itself: nothing runs in between
    assert await active(client, org) == []
    assert await quota(client, org) == {"allowed": True, "remaining": 500, "reason": None,
                                        "held": 0}
    assert (await client.delete(f"/v1/orgs/{org}/holds/b")).json()["released"] is False
    # a batch record settles its hold too
    await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "c", "units": 50})
    batch = await client.post("/v1/usage/batch", json={"records": [
        {"org_id": org, "run_id": "c", "units": 20, "hold_id": "c"},
        {"org_id": org, "run_id": "d", "units": 1, "hold_id": "unknown-hold"}]})
    assert [r["applied"] for r in batch.json()["results"]] == [True, True]
    assert await quota(client, org) == {"allowed": True, "remaining": 479, "reason": None,
                                        "held": 0}


async def test_refusals(client: httpx.AsyncClient, org: str, db: Database,
                        config: BillingConfig) -> None:
    unknown = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "a", "units": 1})
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "ORG_NOT_FOUND")
    for path in (f"/v1/orgs/{org}/holds", f"/v1/orgs/{org}/holds/a"):
        method = client.get if path.endswith("holds") else client.delete
        assert error_of(await method(path))["code"] == "ORG_NOT_FOUND"
    await registered(client, org)
    await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "a", "units": 450})
    refused = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "b", "units": 51})
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert (error["code"], error["remaining"]) == ("INSUFFICIENT_UNITS", 50)
    assert set(error) == {"code", "message", "remaining"}
    assert await db.holds.find_one({"_id": f"{org}/b"}) is None  # a refusal writes nothing
    exact = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "b", "units": 50})
    assert (exact.status_code, exact.json()["remaining"]) == (201, 0)
    gate = await quota(client, org)
    assert (gate["allowed"], gate["reason"], gate["held"]) == (False, "METER_EXHAUSTED", 500)
    missing = await client.delete(f"/v1/orgs/{org}/holds/nope")
    assert (missing.status_code, error_of(missing)["code"]) == (404, "HOLD_NOT_FOUND")
    for body in ({"hold_id": "c", "units": 1, "costs": {"llm": 1}}, {"hold_id": "c d"},
                 {"hold_id": "c", "ttl_seconds": 0}, {"hold_id": "c", "ttl_seconds": 86_401},
                 {"hold_id": "c", "units": -1}, {"units": 1}, {"hold_id": "c", "extra": 1}):
        bad = await client.post(f"/v1/orgs/{org}/holds", json=body)
        assert (bad.status_code, error_of(bad)["code"]) == (422, "VALIDATION_ERROR"), body
    bad_usage = await client.post("/v1/usage", json={"org_id": org, "run_id": "r",
                                                     "hold_id": "x y"})
    assert bad_usage.status_code == 422
    assert (await client.delete(f"/v1/orgs/{org}/holds/a:b")).status_code == 422
    assert (await client.get("/v1/orgs/bad org/holds")).status_code == 422

    await client.delete(f"/v1/orgs/{org}/holds/a")
    await subscribed(db, config, org, "past_due", utcnow() - timedelta(days=8), utcnow())
    past_due = await client.post(f"/v1/orgs/{org}/holds", json={"hold_id": "e", "units": 1})
    assert past_due.status_code == 409
    assert (past_due.json()["error"]["code"], past_due.json()["error"]["remaining"]) == (
        "PAYMENT_PAST_DUE", 450)
    # usage is never refused, whatever the holds
    assert (await client.post("/v1/usage", json={"org_id": org, "run_id": "late", "units": 900,
                                                 "hold_id": "e"})).json()["applied"] is True


TWENTY, UNITS, EXPECTED = 20, 75, 6  # 6 * 75 = 450 <= 500 < 7 * 75


async def twenty_holds(apis: list[httpx.AsyncClient], org: str) -> list[httpx.Response]:
    """Twenty holds of 75 units at once, spread over `apis`."""
    return list(await asyncio.gather(*(
        apis[i % len(apis)].post(f"/v1/orgs/{org}/holds",
                                 json={"hold_id": f"run-{i}", "units": UNITS})
        for i in range(TWENTY))))


async def assert_six_of_twenty(answers: list[httpx.Response], api: httpx.AsyncClient,
                               org: str) -> None:
    granted = [a.json() for a in answers if a.status_code == 201]
    refused = [a.json()["error"] for a in answers if a.status_code != 201]
    assert len(granted) == EXPECTED, [a.text for a in answers]
    assert {e["code"] for e in refused} == {"INSUFFICIENT_UNITS"}
    assert all(a.status_code in (201, 409) for a in answers)
    # in the order MongoDB serialized them, each grant saw the ones before it
    assert sorted(g["remaining"] for g in granted) == [500 - UNITS * k for k in range(6, 0, -1)]
    assert {e["remaining"] for e in refused} == {50}
    assert len(await active(api, org)) == EXPECTED
    assert await quota(api, org) == {"allowed": True, "remaining": 50, "reason": None,
                                     "held": 450}


async def test_twenty_concurrent_holds_through_one_api_process(
    client: httpx.AsyncClient, org: str
) -> None:
    await registered(client, org)
    await assert_six_of_twenty(await twenty_holds([client], org), client, org)


async def test_twenty_concurrent_holds_through_two_api_processes(
    runtime: Runtime, temporal_client: Client, org: str, tmp_path: Path
) -> None:
    env = worker_env(runtime.settings, temporal_client)
    async with serving(env, tmp_path / "api-0.log") as one, \
            serving(env, tmp_path / "api-1.log") as two:
        await registered(one, org)
        await assert_six_of_twenty(await twenty_holds([one, two], org), two, org)
