"""The event loop of the engine's long-running processes (`billing dev`, `billing worker`).

uvloop when it is installed (a dependency wherever it builds: Linux and macOS), else asyncio's
own loop. Both processes spend much of their CPU in the loop itself: MongoDB and Temporal
round trips, HTTP requests. `billing serve` gets the same from uvicorn, which picks uvloop and
httptools by itself when they are installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new event loop (as `asyncio.run`)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
