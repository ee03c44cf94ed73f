"""The one place that reads the wall clock outside workflows (workflows use `workflow.now()`)."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
