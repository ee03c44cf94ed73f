"""What long operator operations share: progress callbacks and bounded concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

#: `(done, total)`; total is None while unknown.
OnProgress = Callable[[int, int | None], None]

#: Visibility reads and histories fetched at once.
CONCURRENCY = 8
#: How often a long server-side operation (a batch job, a triggered schedule) is polled.
POLL_S = 0.5


def no_progress(done: int, total: int | None) -> None:
    return None


async def bounded(items: Iterable[Awaitable[T]], on_progress: OnProgress,
                   total: int) -> list[T]:
    """Await `items` at most `CONCURRENCY` at a time, in order, reporting each one done."""
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def one(item: Awaitable[T]) -> T:
        nonlocal done
        async with gate:
            result = await item
        done += 1
        on_progress(done, total)
        return result

    return list(await asyncio.gather(*(one(item) for item in items)))
