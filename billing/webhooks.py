"""Outbound webhooks (SPEC §5.7): what one delivery sends, where, and under which workflow id.

Pure functions of plain data; the POST is in `activities/webhooks.py`, the starts in
`starter/webhook_dispatch.py`. Signatures come from the `standardwebhooks` library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel
from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)


class OutboundNotification(BaseModel):
    """The body of a delivery: `{"id", "type", "org_id", "seq", "created_at", "payload"}`, in
    that order."""

    id: str
    type: str
    org_id: str
    seq: int
    created_at: datetime
    payload: dict[str, Any]


class WebhookDelivery(BaseModel):
    """One notification to one receiver (`WebhookDeliveryWorkflow`); `budget_seconds` bounds
    the retries (3 days by default, `BILLING_WEBHOOK_BUDGET_SECONDS`)."""

    receiver: str
    notification: OutboundNotification
    budget_seconds: int


class DeliveryResult(BaseModel):
    receiver: str
    status: int
    attempt: int


def receiver_hash(url: str) -> str:
    """A short name of a receiver URL, stable across processes and releases (12 hex digits of
    its SHA-256): the same URL always names the same deliveries."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]


def delivery_workflow_id(url: str, org_id: str, seq: int) -> str:
    """`deliver-<receiver hash>-<org>-<seq>`: one workflow per notification and receiver, so a
    second start of the same delivery finds the first."""
    return f"deliver-{receiver_hash(url)}-{org_id}-{seq}"


def notification_body(notification: OutboundNotification) -> str:
    """The exact JSON text that is signed and sent."""
    return notification.model_dump_json()


def signed_headers(
    notification_id: str, body: str, secrets: tuple[str, ...], now: datetime
) -> dict[str, str]:
    """Standard Webhooks headers: `webhook-id` is the notification's id (the same on every
    attempt, receivers deduplicate on it), `webhook-timestamp` this attempt's time, and one
    `v1,<signature>` per secret, space-separated: during a rotation a receiver holding either
    secret verifies (the first secret is the current one)."""
    if not secrets:
        raise ValueError("no webhook signing secret")
    signatures = [Webhook(secret).sign(notification_id, now, body) for secret in secrets]
    return {
        "webhook-id": notification_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


def check_receivers(urls: tuple[str, ...], secrets: tuple[str, ...]) -> None:
    """Raise `ValueError` naming the problem when receivers are configured without a usable
    secret, or a receiver is not an http(s) URL. No receiver and no secret is valid (no
    delivery)."""
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"BILLING_WEBHOOK_URL: {url!r} is not an http(s) URL")
    if urls and not secrets:
        raise ValueError("BILLING_WEBHOOK_URL is set but BILLING_WEBHOOK_SECRET is not: "
                         "set a Standard Webhooks secret (whsec_<base64>)")
    for position, secret in enumerate(secrets, start=1):
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"BILLING_WEBHOOK_SECRET: secret {position} does not start with "
                             f"{SECRET_PREFIX}")
        key = secret.removeprefix(SECRET_PREFIX)
        try:
            valid = bool(base64.b64decode(key + "=" * (-len(key) % 4), validate=True))
        except binascii.Error:
            valid = False
        if not valid:
            raise ValueError(f"BILLING_WEBHOOK_SECRET: secret {position} is not "
                             f"{SECRET_PREFIX}<base64>")
