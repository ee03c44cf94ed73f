"""Automatic top-up (SPEC §5.8): one off-session purchase of the configured pack.

Started by the worker's dispatcher with id `auto-topup-<org>-<n>` (the trigger's id) and `OrgId`
at start. The charge is idempotent on Stripe (the workflow id is its idempotency key) and the
record of its outcome on MongoDB (the trigger closes once), so a retried activity or a reset run
buys once.
"""

from __future__ import annotations

from temporalio import workflow

from billing.models import AutoTopUpOrder, AutoTopUpResult
from workflows import steps
from workflows.common import FAIL_ON, STRIPE_TIMEOUT, call


@workflow.defn(failure_exception_types=FAIL_ON)
class AutoTopUpWorkflow:
    @workflow.run
    async def run(self, order: AutoTopUpOrder) -> AutoTopUpResult:
        charge = await call(steps.auto_topup_charge, order, start_to_close=STRIPE_TIMEOUT)
        return await call(steps.auto_topup_record, charge)
