"""ISO weeks in UTC (SPEC §5.2): `YYYY-Www`, weeks start Monday 00:00 UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def iso_week(moment: datetime) -> str:
    """The ISO week key of an aware or naive-UTC datetime: 2024-12-30 -> `2025-W01`."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    year, week, _ = moment.isocalendar()
    return f"{year:04d}-W{week:02d}"


def week_start(week: str) -> datetime:
    """Monday 00:00 UTC of a week key."""
    return datetime.strptime(f"{week}-1", "%G-W%V-%u").replace(tzinfo=UTC)


def next_week(week: str) -> str:
    return iso_week(week_start(week) + timedelta(days=7))


def previous_week(week: str) -> str:
    return iso_week(week_start(week) - timedelta(days=7))
