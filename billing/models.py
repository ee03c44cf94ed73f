"""Payloads that cross the Temporal boundary (workflow <-> activity), as pydantic models.

They live in the domain core so that workflows can use them without importing any I/O library.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class ExpirePage(BaseModel):
    now: datetime
    after: str | None = None
    limit: int = 200


class ExpirePageResult(BaseModel):
    expired: int
    units: int
    next_after: str | None
