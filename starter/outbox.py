"""The outbox dispatcher (see `billing/store/outbox.py`): polls a collection for documents
marked pending, runs `start` for each (which must be idempotent: it starts workflows with
deterministic ids), then clears the mark.

It runs in every worker process. Started after commit and swept after a crash by the same loop,
nothing marked is ever skipped; two workers dispatching the same document start the same
workflow ids, which Temporal runs once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from billing.store import outbox

Doc = dict[str, Any]
Start = Callable[[Doc], Awaitable[None]]

log = logging.getLogger(__name__)

PAGE = 200
CONCURRENCY = 32


async def dispatch_pending(collection: AsyncCollection[Doc], start: Start) -> int:
    """Start and clear every pending document, oldest first; the number dispatched. A document
    whose start fails is logged and keeps its mark for the next poll."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(doc: Doc) -> bool:
        async with gate:
            try:
                await start(doc)
                await outbox.clear(collection, doc["_id"])
            except Exception:
                log.exception("outbox: dispatch of %s %s failed; it stays pending",
                              collection.name, doc["_id"])
                return False
            return True

    dispatched = 0
    while page := await outbox.pending(collection, PAGE):
        done = await asyncio.gather(*(one(doc) for doc in page))
        dispatched += sum(done)
        if not all(done):
            break  # the failed ones lead the next page: wait for the next poll
    return dispatched


async def run_dispatcher(
    collection: AsyncCollection[Doc], start: Start, *, poll_s: float,
    after_poll: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Dispatch every `poll_s` seconds until cancelled. A failed poll (MongoDB or Temporal
    unreachable) is logged and tried again at the next one; the marks stay meanwhile."""
    while True:
        try:
            await dispatch_pending(collection, start)
            if after_poll is not None:
                await after_poll()
        except Exception:
            log.exception("outbox dispatch of %s failed; retrying in %s s", collection.name,
                          poll_s)
        await asyncio.sleep(poll_s)
