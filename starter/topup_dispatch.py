"""Starts the workflow of every recorded auto top-up trigger (SPEC §5.8), in the worker process.

A trigger is written in the transaction of the ledger write that called for it, marked
`dispatch`. This loop polls the marked triggers, starts `AutoTopUpWorkflow` with the trigger's id
(`REJECT_DUPLICATE` + `USE_EXISTING`: a second start of one id, after a crash between the start and
the unmarking, is a no-op) and then clears the mark. The start after commit and the recovery
after a crash are the same code, so a trigger is never lost nor bought twice.

The seam: `pending` (what is left to start) and `start` (what to start for one document).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

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
from billing.store.database import Doc
from workflows.auto_topup import AutoTopUpWorkflow
from workflows.search import ORG_ID

logger = logging.getLogger(__name__)


class TopUpDispatcher:
    def __init__(self, client: Client, runtime: Runtime) -> None:
        self.client = client
        self.task_queue = runtime.settings.temporal_task_queue
        self.store = runtime.auto_topups
        self.interval_s = runtime.settings.auto_topup_dispatch_interval_s

    async def pending(self) -> list[Doc]:
        return await self.store.pending()

    async def start(self, doc: Doc) -> None:
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
        await self.store.dispatched(order.trigger_id)

    async def dispatch_once(self) -> int:
        """Start what is pending; the number started."""
        started = 0
        for doc in await self.pending():
            await self.start(doc)
            started += 1
        return started

    async def run(self) -> None:
        """Poll until cancelled. A failed round (MongoDB or Temporal unreachable) is logged and
        tried again at the next tick: the marks stay until their workflow is started."""
        while True:
            try:
                await self.dispatch_once()
            except Exception:
                logger.exception("auto top-up dispatch failed; retrying in %.1f s",
                                 self.interval_s)
            await asyncio.sleep(self.interval_s)
