"""The worker's composition: every workflow and activity it registers, and how it runs them.

This module imports no `starter` module: the processes that run a worker (`billing worker`,
`billing dev`, see `starter/worker_process.py`) import it, not the other way round.
"""

from __future__ import annotations

import asyncio
import compileall
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import billing
import workflows
from activities.registry import activities_for
from billing.runtime import Runtime
from workflows.admin_adjustment import AdminAdjustmentWorkflow
from workflows.auto_topup import AutoTopUpWorkflow
from workflows.common import attempt_limit
from workflows.dunning import DunningWorkflow
from workflows.expire_credits import ExpireCreditsWorkflow
from workflows.org_sweep import OrgSweepWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.stripe_event import StripeEventWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow
from workflows.weekly_reset import WeeklyResetOrgWorkflow, WeeklyResetWorkflow

log = logging.getLogger(__name__)

WORKFLOWS: Sequence[type] = (
    ExpireCreditsWorkflow,
    AdminAdjustmentWorkflow,
    WeeklyResetWorkflow,
    WeeklyResetOrgWorkflow,
    StripeEventWorkflow,
    DunningWorkflow,
    ReconcileWorkflow,
    OrgSweepWorkflow,
    AutoTopUpWorkflow,
    WebhookDeliveryWorkflow,
)


#: The sandbox re-imports a workflow's modules for every run: for `billing.models` that means
#: building every pydantic model's schema again, tens of milliseconds of CPU per workflow. The
#: models are plain data classes, so the sandbox shares the worker's module instead.
SANDBOX = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules("billing.models")
)


class LocalAttemptLimit(Interceptor):
    """Ends a local activity's attempt at its own start-to-close: the workflow gives a local step
    its whole retry budget as start-to-close (`workflows.common.retry_budget`, which says why),
    so the worker bounds each attempt. A timed-out attempt fails like any other and is retried."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _LocalAttemptLimit(next)


class _LocalAttemptLimit(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        if not info.is_local or info.start_to_close_timeout is None:
            return await self.next.execute_activity(input)
        async with asyncio.timeout(attempt_limit(info.start_to_close_timeout).total_seconds()):
            return await self.next.execute_activity(input)


def cache_bytecode(*modules: ModuleType) -> None:
    """Write the bytecode of `modules` (of every module under a package) where no up-to-date
    `.pyc` exists, even under `PYTHONDONTWRITEBYTECODE`.

    The sandbox imports a workflow's modules afresh for every run; without cached bytecode each
    run compiles their source again: for `StripeEventWorkflow` that is about 5 ms of CPU per
    event, as much as the rest of its workflow code (BENCHMARKS.md, webhook). An install that
    cannot be written to logs a warning and runs on, only slower.
    """
    for module in modules:
        path = Path(module.__path__[0] if hasattr(module, "__path__") else str(module.__file__))
        # quiet=1: only what failed, and why, is printed.
        cached = (compileall.compile_dir(path, quiet=1) if path.is_dir()
                  else compileall.compile_file(path, quiet=1))
        if not cached:
            log.warning("cannot cache bytecode: workflow runs compile their modules each time",
                        extra={"path": str(path)})


def build_worker(client: Client, runtime: Runtime, task_queue: str | None = None) -> Worker:
    """The engine's worker; first caches the bytecode of the packages its sandbox imports."""
    cache_bytecode(workflows, billing)
    return Worker(
        client,
        task_queue=task_queue or runtime.settings.temporal_task_queue,
        workflows=list(WORKFLOWS),
        activities=activities_for(runtime),
        workflow_runner=SANDBOX,
        interceptors=[LocalAttemptLimit()],
    )

