"""The outbox: a document written in a transaction is marked `dispatch: "pending"` in that same
transaction, and a dispatcher (`starter/outbox.py`) starts what it asks for after commit, then
clears the mark. A crash between the commit and the start leaves the mark, so the next poll
starts it; a crash between the start and the clear starts it again under the same workflow id,
which finds the first run.

Each collection using it needs the `outbox` index: `(dispatch, created_at)`, partial on
`dispatch` being set, so the poll reads only pending documents, oldest first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

Doc = dict[str, Any]

FIELD = "dispatch"
PENDING = "pending"
#: Set on a new document (in `$setOnInsert`) to put it in the outbox.
MARK: Doc = {FIELD: PENDING}
#: Partial on the very predicate the poll uses: MongoDB uses a partial index only for queries it
#: can prove fall inside the filter, and an equality is the one it always can.
INDEX = IndexModel([(FIELD, ASCENDING), ("created_at", ASCENDING)], name="outbox",
                   partialFilterExpression=MARK)


async def pending(collection: AsyncCollection[Doc], limit: int) -> list[Doc]:
    """Up to `limit` documents waiting for dispatch, oldest first."""
    cursor = collection.find({FIELD: PENDING}).sort("created_at", ASCENDING).limit(limit)
    return [doc async for doc in cursor]


async def clear(collection: AsyncCollection[Doc], doc_id: Any) -> None:
    """Take a document out of the outbox once what it asked for is started."""
    await collection.update_one({"_id": doc_id, FIELD: PENDING}, {"$unset": {FIELD: ""}})


async def oldest_pending(collection: AsyncCollection[Doc]) -> datetime | None:
    """`created_at` of the oldest document still waiting for dispatch."""
    doc = await collection.find_one({FIELD: PENDING}, {"created_at": 1},
                                    sort=[("created_at", ASCENDING)])
    return None if doc is None else doc["created_at"]
