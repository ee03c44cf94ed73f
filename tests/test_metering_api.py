"""`POST /v1/usage`, the meter, the quota gate and notifications over HTTP (real database)."""

from __future__ import annotations

from datetime import timedelta

from http_helpers import error_of
from httpx import AsyncClient
from meter_helpers import subscribed

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.store.database import Database
from billing.weeks import iso_week

USAGE_FIELDS = {"applied", "units", "overflow", "week", "used", "quota", "balance"}


async def test_usage_counts_once_and_replays_the_first_result(api: AsyncClient, org: str) -> None:
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    body = {"org_id": org, "run_id": "run-1", "costs": {"llm": 0.0123, "search": 0.002}}
    first = await api.post("/v1/usage", json=body)
    assert first.status_code == 200
    assert set(first.json()) == USAGE_FIELDS
    # free plan: ratio 1, quota 0 -> 12 + 2 units, all paid from the 500-unit signup grant
    assert first.json() == {"applied": True, "units": 14, "overflow": 14,
                            "week": iso_week(utcnow()), "used": 14, "quota": 0, "balance": 486}
    replay = await api.post("/v1/usage", json={**body, "costs": {"llm": 5}})
    assert replay.status_code == 200
    assert replay.json() == {**first.json(), "applied": False}
    base = await api.post("/v1/usage", json={"org_id": org, "run_id": "run-1", "step": "retry:1",
                                             "costs": None})
    assert (base.json()["units"], base.json()["used"]) == (1, 15)
    given = await api.post("/v1/usage", json={"org_id": org, "run_id": "run-2", "units": 5})
    assert (given.json()["units"], given.json()["balance"]) == (5, 480)


async def test_usage_errors(api: AsyncClient, org: str) -> None:
    unknown = await api.post("/v1/usage", json={"org_id": org, "run_id": "r1"})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "ORG_NOT_FOUND"
    for body, field in [
        ({"org_id": org, "run_id": "r1", "step": "no spaces"}, "step"),
        ({"org_id": org, "run_id": "r1", "costs": {"llm": "much"}}, "costs"),
        ({"org_id": org, "run_id": "r1", "units": -3}, "units"),
        ({"org_id": org}, "run_id"),
        ({"org_id": "bad org", "run_id": "r1"}, "org_id"),
    ]:
        response = await api.post("/v1/usage", json=body)
        assert response.status_code == 422, body
        error = error_of(response)
        assert error["code"] == "VALIDATION_ERROR" and field in error["message"]
    both = await api.post("/v1/usage", json={"org_id": org, "run_id": "r1", "costs": {},
                                             "units": 1})
    assert both.status_code == 422 and "not both" in error_of(both)["message"]
    unauthorized = await api.post("/v1/usage", json={"org_id": org, "run_id": "r1"},
                                  headers={"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401


async def test_meter_quota_and_notifications(api: AsyncClient, org: str, db: Database,
                                             config: BillingConfig) -> None:
    assert (await api.get(f"/v1/orgs/{org}/meter")).status_code == 404
    assert (await api.get(f"/v1/orgs/{org}/quota")).status_code == 404
    assert (await api.get(f"/v1/orgs/{org}/notifications")).status_code == 404
    await api.put(f"/v1/orgs/{org}")
    meter = await api.get(f"/v1/orgs/{org}/meter")
    assert meter.json() == {"org_id": org, "week": iso_week(utcnow()), "used": 0, "quota": 0,
                            "plan_id": "free", "remaining": 0, "held": 0}
    assert (await api.get(f"/v1/orgs/{org}/quota")).json() == {
        "allowed": True, "remaining": 500, "reason": None, "held": 0}
    await api.post("/v1/usage", json={"org_id": org, "run_id": "big", "units": 520})
    assert (await api.get(f"/v1/orgs/{org}/quota")).json() == {
        "allowed": False, "remaining": -20, "reason": "METER_EXHAUSTED", "held": 0}
    assert (await api.get(f"/v1/orgs/{org}/meter")).json()["used"] == 520
    notes = (await api.get(f"/v1/orgs/{org}/notifications")).json()["notifications"]
    assert [(n["type"], n["payload"]["threshold"]) for n in notes] == [
        ("extras.balance_threshold_crossed", 0)]
    assert set(notes[0]) == {"id", "seq", "type", "key", "payload", "created_at"}
    assert notes[0]["seq"] == 1
    await subscribed(db, config, org, "past_due", utcnow() - timedelta(days=8), utcnow())
    gate = (await api.get(f"/v1/orgs/{org}/quota")).json()
    assert (gate["allowed"], gate["reason"]) == (False, "PAYMENT_PAST_DUE")


async def test_a_batch_records_each_record_once_and_refuses_only_the_bad_ones(
    api: AsyncClient, org: str
) -> None:
    await api.put(f"/v1/orgs/{org}")
    records = [
        {"org_id": org, "run_id": "b1", "units": 100},
        {"org_id": org, "run_id": "b2", "costs": {"gpu": 0.25}},
        {"org_id": "nobody-registered-this", "run_id": "b3", "units": 1},
        {"org_id": org, "run_id": "b4", "units": 5, "costs": {"gpu": 1}},
        {"org_id": org, "run_id": "b1", "units": 100},
    ]
    first = await api.post("/v1/usage/batch", json={"records": records})
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert [r.get("applied") for r in results] == [True, True, None, None, False]
    assert (results[0]["units"], results[1]["units"]) == (100, 250)
    assert results[2]["error"]["code"] == "ORG_NOT_FOUND"
    assert results[3]["error"]["code"] == "VALIDATION_ERROR"
    assert results[4] == {**results[0], "applied": False}
    assert (await api.get(f"/v1/orgs/{org}/meter")).json()["used"] == 350
    again = (await api.post("/v1/usage/batch", json={"records": records})).json()["results"]
    assert [r.get("applied") for r in again] == [False, False, None, None, False]
    assert (await api.get(f"/v1/orgs/{org}/meter")).json()["used"] == 350
    for body in ({"records": []}, {"records": [records[0]] * 1001}, {"rows": records}):
        refused = await api.post("/v1/usage/batch", json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "VALIDATION_ERROR")
