"""The one way the engine builds its Stripe API client (activities and the HTTP API alike)."""

from __future__ import annotations

import stripe

from billing.config import Settings
from billing.errors import BillingError
from billing.stripe import REQUEST_TIMEOUT


class StripeNotConfigured(BillingError):
    status = 503
    code = "STRIPE_NOT_CONFIGURED"


def stripe_client(settings: Settings, *, network_retries: int = 0) -> stripe.StripeClient:
    """A client at `STRIPE_API_BASE` when it is set (a local fake in tests and `billing dev`).

    Activities keep the SDK's own retries off (`network_retries=0`): Temporal retries them, so
    every attempt is in the workflow history. A request answered to a person may retry a
    network error itself: every write it makes carries an idempotency key."""
    if not settings.stripe_api_key:
        raise StripeNotConfigured("STRIPE_API_KEY is not set")
    base = settings.stripe_api_base
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": base} if base else None,
        max_network_retries=network_retries,
        http_client=stripe.HTTPXClient(timeout=REQUEST_TIMEOUT.total_seconds()),
    )
