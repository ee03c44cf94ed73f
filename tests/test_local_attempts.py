"""A local step's attempt is ended at its own start-to-close by the worker
(`worker.LocalAttemptLimit`), then retried: the workflow gives it its whole retry budget."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from worker import LocalAttemptLimit
from workflows.common import call


@activity.defn(name="slow_first_attempt")
async def slow_first_attempt(hang_s: float) -> int:
    """Hangs on its first attempt, answers its attempt number on the next."""
    if activity.info().attempt == 1:
        await asyncio.sleep(hang_s)
    return activity.info().attempt


@workflow.defn(sandboxed=False)
class OneLocalStep:
    @workflow.run
    async def run(self, hang_s: float) -> int:
        return await call(slow_first_attempt, hang_s, start_to_close=timedelta(seconds=1),
                          local=True)


async def test_a_hung_local_attempt_ends_at_its_start_to_close_and_is_retried(
    temporal_client: Client,
) -> None:
    queue = f"local-attempts-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal_client, task_queue=queue, workflows=[OneLocalStep],
                      activities=[slow_first_attempt], interceptors=[LocalAttemptLimit()],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        # The budget is 5 x 1 s + 15 s of backoffs: without the limit the first attempt would
        # hang its 8 s and answer 1.
        attempt = await temporal_client.execute_workflow(
            OneLocalStep.run, 8.0, id=f"local-attempts-{uuid.uuid4().hex[:8]}", task_queue=queue)
    assert attempt == 2
