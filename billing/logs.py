"""Structured JSON logs for every process (`billing serve`, `billing worker`, `billing dev`).

Code logs through the standard library (`logging.getLogger(__name__)`) and passes ids as
`extra={"org_id": ..., "event_id": ...}`; Temporal's workflow and activity loggers contribute the
workflow id. Values that look like secrets (API keys, webhook secrets, bearer tokens, signatures,
card numbers) never reach the output.
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any

import structlog

SENSITIVE_KEYS = re.compile(
    r"(secret|token|password|authorization|signature|api_key|card|cvc|client_secret)", re.I
)
SENSITIVE_VALUES = re.compile(
    r"(whsec_[A-Za-z0-9]+|[sr]k_(live|test)_[A-Za-z0-9]+|Bearer\s+\S+|"
    r"t=\d+,v1=[0-9a-f]+|\b(?:\d[ -]?){13,19}\b)"
)
REDACTED = "[redacted]"

EventDict = MutableMapping[str, Any]


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return SENSITIVE_VALUES.sub(REDACTED, value)
    if isinstance(value, dict):
        return {k: REDACTED if SENSITIVE_KEYS.search(str(k)) else redact_value(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def _redact(_: Any, __: str, event: EventDict) -> EventDict:
    for key in list(event):
        if SENSITIVE_KEYS.search(key):
            event[key] = REDACTED
        else:
            event[key] = redact_value(event[key])
    return event


def _temporal_ids(_: Any, __: str, event: EventDict) -> EventDict:
    """Lift the ids of Temporal's `temporal_workflow` / `temporal_activity` extras to the top."""
    for extra in ("temporal_workflow", "temporal_activity"):
        details = event.pop(extra, None)
        if isinstance(details, dict):
            event.setdefault("workflow_id", details.get("workflow_id"))
            for key in ("workflow_type", "activity_type", "attempt"):
                if key in details:
                    event.setdefault(key, details[key])
    return event


def configure_logging(level: str = "INFO", *, json: bool = True) -> None:
    """Route every standard-library log record through structlog to one JSON line."""
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _temporal_ids,
        structlog.processors.format_exc_info,
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=pre_chain,
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for noisy in ("pymongo", "httpx", "httpcore", "stripe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
