"""Reading the API's answers in tests."""

from __future__ import annotations

from httpx import Response


def error_of(response: Response) -> dict[str, str]:
    """The `{"error": {"code", "message"}}` body, asserting it has exactly that shape."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return dict(body["error"])
