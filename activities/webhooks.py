"""The POST of an outbound webhook (SPEC §5.7), signed per Standard Webhooks."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from bson import ObjectId
from temporalio import activity
from temporalio.exceptions import ApplicationError

from billing.metrics import WEBHOOK_DELIVERIES, WEBHOOK_DELIVERY_SECONDS
from billing.runtime import Runtime
from billing.store import deliveries
from billing.webhooks import (
    DeliveryResult,
    OutboundNotification,
    WebhookDelivery,
    notification_body,
    receiver_hash,
    signed_headers,
)

#: Seconds a receiver has to answer one attempt.
HTTP_TIMEOUT_S = 10.0
USER_AGENT = "billing-engine-webhooks"


async def post_notification(http: httpx.AsyncClient, url: str,
                            notification: OutboundNotification,
                            secrets: tuple[str, ...]) -> int:
    """POST the signed notification with a fresh `webhook-timestamp`; the receiver's status.
    Connection errors and timeouts raise `httpx.HTTPError`."""
    body = notification_body(notification)
    headers = signed_headers(notification.id, body, secrets, datetime.now(UTC))
    response = await http.post(url, content=body.encode("utf-8"),
                               headers={**headers, "user-agent": USER_AGENT})
    return response.status_code


class WebhookActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.http = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, follow_redirects=False)

    @activity.defn(name="deliver_webhook")
    async def deliver_webhook(self, delivery: WebhookDelivery) -> DeliveryResult:
        """One attempt: 2xx records the acknowledgement and completes; another status, a
        connection error or a timeout raises, and Temporal retries within the budget. Signed
        with the secrets configured now, so a retry after a rotation uses the new one."""
        note = delivery.notification
        try:
            status = await post_notification(self.http, delivery.receiver, note,
                                             self.runtime.settings.webhook_signing_secrets)
        except httpx.HTTPError as exc:
            WEBHOOK_DELIVERIES.labels("unreachable").inc()
            raise ApplicationError(f"{delivery.receiver}: {type(exc).__name__}: {exc}",
                                   type="WEBHOOK_UNREACHABLE") from exc
        if not 200 <= status < 300:
            WEBHOOK_DELIVERIES.labels("rejected").inc()
            raise ApplicationError(f"{delivery.receiver} answered {status}",
                                   type="WEBHOOK_REJECTED")
        WEBHOOK_DELIVERIES.labels("delivered").inc()
        WEBHOOK_DELIVERY_SECONDS.observe(
            max(0.0, (datetime.now(UTC) - note.created_at).total_seconds()))
        await deliveries.delivered(self.runtime.db, ObjectId(note.id),
                                   receiver_hash(delivery.receiver))
        return DeliveryResult(receiver=delivery.receiver, status=status,
                              attempt=activity.info().attempt)
