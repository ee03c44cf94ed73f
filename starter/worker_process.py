"""The worker process (`billing worker`, and the worker inside `billing dev`): what must be true
before it polls, then the worker `worker.py` composes."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client

from billing.runtime import Runtime
from billing.store.migrations import migrate
from starter import tracing
from starter.schedules import ensure_schedules
from starter.temporal_client import connect
from starter.topup_dispatch import run_topup_dispatcher
from starter.webhook_dispatch import run_webhook_dispatcher
from worker import build_worker

log = logging.getLogger(__name__)


async def prepare(runtime: Runtime) -> Client:
    """The durability check, indexes, start-up migrations and schedules, all idempotent;
    returns the client."""
    await runtime.db.check_durable()
    await runtime.db.ensure_indexes()
    changed = await migrate(runtime.db, runtime.subscriptions, runtime.config)
    if any(changed.values()):
        log.info("start-up migrations: %s", ", ".join(f"{k} {n}" for k, n in changed.items()),
                 extra={"migrations": changed})
    client = await connect(runtime.settings)
    await ensure_schedules(client, runtime.settings.temporal_task_queue)
    return client


async def run_worker(runtime: Runtime) -> None:
    """Prepare, then run the worker and the outbox dispatchers (outbound webhooks, automatic
    top-ups) until cancelled."""
    runtime.settings.check_webhooks()
    tracing.setup_tracing("billing-worker")
    client = await prepare(runtime)
    dispatchers = [
        asyncio.create_task(run_webhook_dispatcher(client, runtime), name="webhook dispatch"),
        asyncio.create_task(run_topup_dispatcher(client, runtime), name="top-up dispatch"),
    ]
    try:
        await build_worker(client, runtime).run()
    finally:
        for dispatcher in dispatchers:
            dispatcher.cancel()
