"""The notification feed (SPEC §5.6, §7): a gapless per-organization `seq` assigned in the
transaction of the change, pages oldest first, and a migration numbering older notifications."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from bson import ObjectId
from httpx import AsyncClient

from billing.store.accounts import Accounts
from billing.store.books import notify
from billing.store.database import Database
from billing.store.notifications import assign_missing_seqs


async def page_all(api: AsyncClient, org: str, limit: int) -> tuple[list[int], int]:
    seqs: list[int] = []
    after, pages = 0, 0
    while True:
        body = (await api.get(f"/v1/orgs/{org}/notifications",
                              params={"after": after, "limit": limit})).json()
        pages += 1
        seqs += [n["seq"] for n in body["notifications"]]
        if body["next_after"] is None:
            return seqs, pages
        assert body["next_after"] == seqs[-1]
        after = body["next_after"]


async def test_concurrent_notifications_get_a_gapless_sequence_and_page_oldest_first(
    api: AsyncClient, accounts: Accounts, db: Database, org: str, now: datetime
) -> None:
    await accounts.register(org, now)
    written = await asyncio.gather(*(
        notify(db, None, org_id=org, type="payment.failed", key=f"payment.failed:evt_{i}",
               payload={"n": i}, now=now) for i in range(25)))
    again = await notify(db, None, org_id=org, type="payment.failed", key="payment.failed:evt_3",
                         payload={"n": 3}, now=now)
    assert all(written) and not again
    seqs, pages = await page_all(api, org, limit=7)
    assert seqs == list(range(1, 26)) and pages == 4
    body = (await api.get(f"/v1/orgs/{org}/notifications", params={"after": 24})).json()
    assert [n["seq"] for n in body["notifications"]] == [25] and body["next_after"] is None
    first = (await api.get(f"/v1/orgs/{org}/notifications", params={"limit": 1})).json()
    note = first["notifications"][0]
    assert (note["type"], note["key"], note["payload"]["n"]) == (
        "payment.failed", f"payment.failed:evt_{note['payload']['n']}", note["payload"]["n"])
    assert (await api.get(f"/v1/orgs/{org}/notifications",
                          params={"limit": 201})).status_code == 422


async def test_a_position_past_any_sequence_number_is_refused(
    api: AsyncClient, accounts: Accounts, org: str, now: datetime
) -> None:
    """`after` beyond a 64-bit integer cannot be asked of MongoDB: a 422, not a 500."""
    await accounts.register(org, now)
    response = await api.get(f"/v1/orgs/{org}/notifications", params={"after": 2**63})
    assert response.status_code == 422
    last = await api.get(f"/v1/orgs/{org}/notifications", params={"after": 2**63 - 1})
    assert last.status_code == 200 and last.json()["notifications"] == []


async def test_the_feed_misses_nothing_while_usage_keeps_writing(
    api: AsyncClient, accounts: Accounts, db: Database, org: str, now: datetime
) -> None:
    await accounts.register(org, now)

    async def write() -> None:
        for i in range(60):
            await notify(db, None, org_id=org, type="reconcile.divergence",
                         key=f"reconcile.divergence:{i}", payload={}, now=now)

    async def read() -> list[int]:
        seen: list[int] = []
        for _ in range(200):
            body = (await api.get(f"/v1/orgs/{org}/notifications",
                                  params={"after": seen[-1] if seen else 0, "limit": 5})).json()
            seen += [n["seq"] for n in body["notifications"]]
            if len(seen) == 60:
                break
            await asyncio.sleep(0.01)
        return seen

    _, seen = await asyncio.gather(write(), read())
    assert seen == list(range(1, 61))


async def test_older_notifications_are_numbered_once_oldest_first(
    accounts: Accounts, db: Database, org: str, now: datetime
) -> None:
    await accounts.register(org, now)
    await notify(db, None, org_id=org, type="plan.changed", key="plan.changed:new", payload={},
                 now=now)
    older = [{"_id": ObjectId(), "org_id": org, "type": "payment.failed", "key": f"old:{i}",
              "payload": {}, "created_at": now - timedelta(days=3 - i)} for i in range(3)]
    await db.notifications.insert_many(list(reversed(older)))
    assert await assign_missing_seqs(db) >= 3
    assert await assign_missing_seqs(db) == 0
    numbered = {d["key"]: d["seq"] async for d in db.notifications.find({"org_id": org})}
    assert numbered == {"plan.changed:new": 1, "old:0": 2, "old:1": 3, "old:2": 4}
