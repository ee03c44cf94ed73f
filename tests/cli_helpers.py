"""Running the `billing` command line from tests: in process (`cli`, against the test servers)
and as a real subprocess (`billing`)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from temporalio.client import Client
from typer.testing import CliRunner

from billing.runtime import Runtime
from starter.cli import app as cli_app
from starter.embedded import find_binary


def cli(client: Client, runtime: Runtime, *args: str) -> Any:
    env = {"TEMPORAL_ADDRESS": client.service_client.config.target_host,
           "TEMPORAL_NAMESPACE": client.namespace,
           "TEMPORAL_TASK_QUEUE": runtime.settings.temporal_task_queue,
           "MONGODB_URI": runtime.settings.mongodb_uri, "MONGODB_DB": runtime.settings.mongodb_db,
           "COLUMNS": "200"}  # rich wraps at 80 columns when it is not on a terminal
    return CliRunner().invoke(cli_app, list(args), env=env)


@dataclass
class Result:
    code: int
    out: str
    err: str


async def billing(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    """Run `billing ARGS` with a clean engine environment plus `env`."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
    base.update({"COLUMNS": "200", **(env or {})})
    proc = await asyncio.create_subprocess_exec(
        BILLING, *args, env=base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


BILLING = find_binary("billing")
