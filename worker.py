"""The Temporal worker: registers every workflow and activity, and ensures the schedules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.admin import AdminActivities
from activities.ledger import LedgerActivities
from billing.config import Settings
from billing.runtime import Runtime
from starter.schedules import ensure_schedules
from workflows.admin_adjustment import AdminAdjustmentWorkflow
from workflows.expire_credits import ExpireCreditsWorkflow

WORKFLOWS: Sequence[type] = (
    ExpireCreditsWorkflow,
    AdminAdjustmentWorkflow,
)


def activities_for(runtime: Runtime) -> list[Callable[..., Any]]:
    ledger = LedgerActivities(runtime)
    admin = AdminActivities(runtime)
    return [
        ledger.expire_credit_page,
        admin.admin_requires_approval,
        admin.admin_post_adjustment,
    ]


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


def build_worker(client: Client, runtime: Runtime, task_queue: str | None = None) -> Worker:
    return Worker(
        client,
        task_queue=task_queue or runtime.settings.temporal_task_queue,
        workflows=list(WORKFLOWS),
        activities=activities_for(runtime),
    )


async def run_worker(runtime: Runtime) -> None:
    """Connect, prepare the database and schedules, and run until cancelled."""
    await runtime.db.ensure_indexes()
    client = await connect(runtime.settings)
    await ensure_schedules(client, runtime.settings.temporal_task_queue)
    await build_worker(client, runtime).run()


if __name__ == "__main__":
    asyncio.run(run_worker(Runtime.from_settings(Settings())))
