"""The Temporal floor the benchmarks divide by: a workflow with one no-op activity (and the same
with a local activity, as the Stripe event's steps run), and a parent that runs N of them as
children, a bounded number at a time.

They use the engine's activity call (`workflows.common.call`: same retry policy and timeout) and
run in the same workflow sandbox, so the difference to the engine's workflows is the engine's
own work.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel
from temporalio import activity, workflow

from workflows.common import FAIL_ON, call


class BareSweep(BaseModel):
    prefix: str
    children: int
    concurrency: int


@activity.defn(name="bench_noop")
async def noop(n: int) -> int:
    return n


@workflow.defn(failure_exception_types=FAIL_ON)
class BenchWorkflow:
    @workflow.run
    async def run(self, n: int) -> int:
        return await call(noop, n)


@workflow.defn(failure_exception_types=FAIL_ON)
class BenchLocalWorkflow:
    @workflow.run
    async def run(self, n: int) -> int:
        return await call(noop, n, local=True)


@workflow.defn(failure_exception_types=FAIL_ON)
class BenchSweepWorkflow:
    """`children` no-op children, at most `concurrency` running at once."""

    @workflow.run
    async def run(self, sweep: BareSweep) -> int:
        slots = asyncio.Semaphore(sweep.concurrency)

        async def child(n: int) -> int:
            async with slots:
                result: int = await workflow.execute_child_workflow(
                    BenchWorkflow.run, n, id=f"{sweep.prefix}-{n}")
                return result

        done = await asyncio.gather(*(child(n) for n in range(sweep.children)))
        return len(done)


WORKFLOWS = (BenchWorkflow, BenchLocalWorkflow, BenchSweepWorkflow)
ACTIVITIES = (noop,)
