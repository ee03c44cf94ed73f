"""`WebhookDeliveryWorkflow` (SPEC §5.7): one notification to one receiver, id
`deliver-<receiver hash>-<org>-<seq>`.

Unlike the billing activities (five attempts), a delivery retries with exponential backoff (1 s
doubling to 1 h apart) for a time budget, 3 days by default: a receiver may be down for a
weekend. Once the budget is spent the workflow fails, the visible dead letter that `billing
failures` lists and `billing retry` runs again with a fresh budget.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

from workflows import steps
from workflows.common import FAIL_ON, call

with workflow.unsafe.imports_passed_through():
    from billing.webhooks import DeliveryResult, WebhookDelivery

DELIVERY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(hours=1),
    maximum_attempts=0,  # bounded by the budget (schedule-to-close), not by a count
)
#: One attempt: the POST (10 s timeout) and recording the acknowledgement.
ATTEMPT_TIMEOUT = timedelta(seconds=30)


@workflow.defn(failure_exception_types=FAIL_ON)
class WebhookDeliveryWorkflow:
    @workflow.run
    async def run(self, delivery: WebhookDelivery) -> DeliveryResult:
        return await call(steps.deliver_webhook, delivery,
                          start_to_close=ATTEMPT_TIMEOUT, retry_policy=DELIVERY_RETRY,
                          schedule_to_close=timedelta(seconds=delivery.budget_seconds))
