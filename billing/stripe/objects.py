"""Reading Stripe objects: ids, metadata and timestamps, tolerant of old and new API shapes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]

ORG_KEYS = ("org_id", "organizationId")
PACK_KEYS = ("pack_id", "packId")
_ORG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def ref_id(value: object) -> str | None:
    """The id of a reference that is either a string id or an expanded object (only a string is
    ever an id: never an object, which would be a query operator)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str) and value["id"]:
        return str(value["id"])
    return None


def expanded(value: object) -> Obj | None:
    """The object of an expanded reference, None for a bare id."""
    return value if isinstance(value, dict) else None


def _metadata(obj: Obj | None) -> Obj:
    meta = (obj or {}).get("metadata")
    return meta if isinstance(meta, dict) else {}


def _first(meta: Obj, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def org_from(*objs: Obj | None) -> str | None:
    """`metadata.org_id` (or the seed's `organizationId`) of the first object naming a valid one."""
    for obj in objs:
        org = _first(_metadata(obj), ORG_KEYS)
        if org is not None and _ORG_ID.fullmatch(org):
            return org
    return None


def pack_from(*objs: Obj | None) -> str | None:
    """`metadata.pack_id` (or the seed's `packId`) of the first object naming one."""
    for obj in objs:
        pack = _first(_metadata(obj), PACK_KEYS)
        if pack is not None:
            return pack
    return None


def whole_list(value: object) -> list[Obj] | None:
    """The items of a Stripe list object carried whole in a payload (`{"object": "list",
    "data": [...], "has_more": false}`), or None when it is absent, not expanded, or only its
    first page (`has_more`): then it must be listed through the API."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        return None
    if value.get("has_more"):
        return None
    return [item for item in value["data"] if isinstance(item, dict)]


def timestamp(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return datetime.fromtimestamp(int(value), UTC)


def amount(value: object) -> int:
    """A non-negative amount in cents (absent or malformed: 0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)
