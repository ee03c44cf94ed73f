"""Automatic top-up (SPEC §5.8) in the worker: what the outbox starts for a recorded trigger.

A trigger is written in the transaction of the ledger write that called for it, in the outbox
(`billing/store/outbox.py`). The dispatcher starts `AutoTopUpWorkflow` under the trigger's id
(`REJECT_DUPLICATE` + `USE_EXISTING`: a second start of one id, after a crash between the start
and the clearing of the mark, is a no-op), so a trigger is never lost nor bought twice.
"""

from __future__ import annotations

import contextlib

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from billing.models import AutoTopUpOrder
from billing.runtime import Runtime
from billing.store.auto_topups import triggers
from billing.store.database import Doc
from starter.outbox import run_dispatcher
from workflows.auto_topup import AutoTopUpWorkflow
from workflows.search import ORG_ID


class TopUpStarter:
    """What the outbox starts for a trigger: its `AutoTopUpWorkflow`."""

    def __init__(self, client: Client, runtime: Runtime) -> None:
        self.client = client
        self.task_queue = runtime.settings.temporal_task_queue

    async def __call__(self, doc: Doc) -> None:
        order = AutoTopUpOrder(trigger_id=doc["_id"], org_id=doc["org_id"],
                               pack_id=doc["pack_id"])
        org = TypedSearchAttributes([SearchAttributePair(ORG_ID, order.org_id)])
        # Already closed: it was started before a crash that kept the mark.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await self.client.start_workflow(
                AutoTopUpWorkflow.run, order, id=order.trigger_id, task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=org,
            )


async def run_topup_dispatcher(client: Client, runtime: Runtime) -> None:
    """The worker's outbox loop for top-up triggers, every `BILLING_OUTBOX_POLL_SECONDS`."""
    await run_dispatcher(triggers(runtime.db), TopUpStarter(client, runtime),
                         poll_s=runtime.settings.billing_outbox_poll_seconds)
