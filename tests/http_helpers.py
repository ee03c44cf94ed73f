"""Reading the API's answers in tests."""

from __future__ import annotations

from collections import Counter

import httpx
from httpx import Response


def error_of(response: Response) -> dict[str, str]:
    """The `{"error": {"code", "message"}}` body, asserting it has exactly that shape."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return dict(body["error"])


async def balance(api: httpx.AsyncClient, org: str) -> int:
    response = await api.get(f"/v1/orgs/{org}/balance")
    assert response.status_code == 200, response.text
    return int(response.json()["balance"])


async def notification_types(api: httpx.AsyncClient, org: str) -> Counter[str]:
    response = await api.get(f"/v1/orgs/{org}/notifications")
    assert response.status_code == 200, response.text
    return Counter(n["type"] for n in response.json()["notifications"])
