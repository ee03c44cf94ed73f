"""Outbound webhooks (SPEC §5.7) in the worker: for every notification leaving the outbox, one
`WebhookDeliveryWorkflow` per receiver; the oldest-undelivered gauge; and the signed sample of
`billing webhooks test`.

Only notifications written while a receiver is configured are delivered: without one, the
dispatcher takes notifications out of the outbox and starts nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.webhooks import HTTP_TIMEOUT_S, post_notification
from billing.config import ConfigError, Settings
from billing.metrics import WEBHOOK_OLDEST_UNDELIVERED_SECONDS
from billing.runtime import Runtime
from billing.store import deliveries, outbox
from billing.store.database import Doc
from billing.webhooks import (
    OutboundNotification,
    WebhookDelivery,
    delivery_workflow_id,
    receiver_hash,
)
from starter.outbox import run_dispatcher
from workflows.search import ORG_ID
from workflows.webhook_delivery import WebhookDeliveryWorkflow


def outbound(doc: Doc) -> OutboundNotification:
    """A stored notification as its receivers see it (the feed's fields and the org)."""
    return OutboundNotification(id=str(doc["_id"]), type=doc["type"], org_id=doc["org_id"],
                                seq=doc["seq"], created_at=doc["created_at"],
                                payload=doc["payload"])


class WebhookStarter:
    """What the outbox starts for a notification: its deliveries, one per receiver."""

    def __init__(self, client: Client, runtime: Runtime) -> None:
        self.client = client
        self.runtime = runtime
        self.receivers = runtime.settings.webhook_receivers

    async def __call__(self, doc: Doc) -> None:
        if not self.receivers:
            return
        note = outbound(doc)
        await deliveries.expect(self.runtime.db, doc["_id"],
                                [receiver_hash(url) for url in self.receivers], note.created_at)
        for url in self.receivers:
            await self._start(url, note, doc)

    async def _start(self, url: str, note: OutboundNotification, doc: Doc) -> None:
        """Start the delivery; one that exists is left alone, and one that completed (the
        dispatcher started it before a crash) is recorded as acknowledged."""
        workflow_id = delivery_workflow_id(url, note.org_id, note.seq)
        settings = self.runtime.settings
        try:
            await self.client.start_workflow(
                WebhookDeliveryWorkflow.run,
                WebhookDelivery(receiver=url, notification=note,
                                budget_seconds=settings.billing_webhook_budget_seconds),
                id=workflow_id,
                task_queue=settings.temporal_task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=TypedSearchAttributes([SearchAttributePair(ORG_ID,
                                                                             note.org_id)]),
            )
        except WorkflowAlreadyStartedError:
            described = await self.client.get_workflow_handle(workflow_id).describe()
            if described.status == WorkflowExecutionStatus.COMPLETED:
                await deliveries.delivered(self.runtime.db, doc["_id"], receiver_hash(url))


async def refresh_oldest_undelivered(runtime: Runtime) -> None:
    """Set the gauge from the oldest notification not started or not acknowledged."""
    oldest = [moment for moment in (await outbox.oldest_pending(runtime.db.notifications),
                                    await deliveries.oldest_undelivered(runtime.db))
              if moment is not None and runtime.settings.webhook_receivers]
    age = (datetime.now(UTC) - min(oldest)).total_seconds() if oldest else 0.0
    WEBHOOK_OLDEST_UNDELIVERED_SECONDS.set(max(0.0, age))


async def run_webhook_dispatcher(client: Client, runtime: Runtime) -> None:
    """The worker's outbox loop for notifications, every `BILLING_OUTBOX_POLL_SECONDS`."""

    async def gauge() -> None:
        await refresh_oldest_undelivered(runtime)

    await run_dispatcher(runtime.db.notifications, WebhookStarter(client, runtime),
                         poll_s=runtime.settings.billing_outbox_poll_seconds, after_poll=gauge)


# ---- billing webhooks test ---------------------------------------------------------------------


@dataclass(frozen=True)
class TestDelivery:
    url: str
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def sample_notification(now: datetime) -> OutboundNotification:
    return OutboundNotification(
        id=f"test_{uuid.uuid4().hex}", type="webhook.test", org_id="test", seq=0,
        created_at=now, payload={"message": "a signed sample from billing webhooks test"},
    )


async def send_test(settings: Settings, url: str | None = None) -> list[TestDelivery]:
    """POST one signed sample to `url`, or to every configured receiver; each one's answer
    (none when there is no receiver)."""
    settings.check_webhooks()
    targets = (url,) if url else settings.webhook_receivers
    if not targets:
        return []
    if not settings.webhook_signing_secrets:
        raise ConfigError("BILLING_WEBHOOK_SECRET is not set: nothing can be signed")
    note = sample_notification(datetime.now(UTC))
    results: list[TestDelivery] = []
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
        for target in targets:
            try:
                status = await post_notification(http, target, note,
                                                 settings.webhook_signing_secrets)
                results.append(TestDelivery(url=target, status=status))
            except httpx.HTTPError as exc:
                results.append(TestDelivery(url=target, status=None,
                                            error=f"{type(exc).__name__}: {exc}"))
    return results
