"""`localstripe` (a Stripe API stand-in from the `dev` extra, written by others) as a process on
127.0.0.1: a peer the project did not write, for one end-to-end test and the benchmarks."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field

from starter.embedded import ensure_port_free, terminate, wait_for_port


@dataclass
class LocalStripe:
    """`localstripe` (a Stripe API stand-in from the `dev` extra) on 127.0.0.1."""

    port: int
    process: asyncio.subprocess.Process | None = field(default=None, init=False)

    API_KEY = "sk_test_localstripe"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        ensure_port_free(self.port, "localstripe")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "localstripe", "--port", str(self.port), "--from-scratch",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        await wait_for_port(self.port, "localstripe", process=self.process)

    async def stop(self) -> None:
        await terminate(self.process, grace_s=10)
        self.process = None
