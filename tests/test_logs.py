"""Logs are JSON lines with the ids operators search by, and never carry secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from billing.logs import configure_logging


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    configure_logging("INFO")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    logging.getLogger().handlers = []


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_ids_are_fields_of_one_json_line(captured: io.StringIO) -> None:
    logging.getLogger("billing.test").info(
        "event applied", extra={"org_id": "acme", "event_id": "evt_1"}
    )
    logging.getLogger("temporal").info(
        "activity done", extra={"temporal_activity": {"workflow_id": "stripe-evt_1",
                                                      "activity_type": "apply"}}
    )
    first, second = _lines(captured)
    assert first["event"] == "event applied" and first["org_id"] == "acme"
    assert first["event_id"] == "evt_1" and first["level"] == "info" and "timestamp" in first
    assert second["workflow_id"] == "stripe-evt_1" and second["activity_type"] == "apply"


def test_secrets_and_card_numbers_are_redacted(captured: io.StringIO) -> None:
    log = logging.getLogger("billing.test")
    log.warning("signature t=1700000000,v1=abcdef0123 failed with whsec_abc123 and sk_live_XYZ9")
    log.warning("auth", extra={"authorization": "Bearer tok", "payload": {"card": "4242"}})
    log.warning("card 4242 4242 4242 4242 declined, header Bearer abc.def")
    text = captured.getvalue()
    for secret in ("abcdef0123", "whsec_abc123", "sk_live_XYZ9", "Bearer tok", "4242 4242",
                   "abc.def"):
        assert secret not in text
    first, second, _ = _lines(captured)
    assert second["authorization"] == "[redacted]"
    assert second["payload"] == {"card": "[redacted]"}
    assert "[redacted]" in str(first["event"])
