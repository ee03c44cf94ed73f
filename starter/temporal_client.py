"""The one place a process connects to Temporal (the API, the CLI, the worker, `billing dev`)."""

from __future__ import annotations

import asyncio

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from billing.config import Settings
from billing.errors import BillingError
from starter import tracing

CONNECT_TIMEOUT_S = 5.0


class TemporalUnavailable(BillingError):
    status = 503
    code = "TEMPORAL_UNAVAILABLE"


async def connect(settings: Settings, *, timeout_s: float = CONNECT_TIMEOUT_S) -> Client:
    """The engine's client (pydantic payloads, the configured namespace, and the tracing
    interceptor when tracing is configured, which workers built on it inherit). A server that cannot
    be reached within `timeout_s` is a `TemporalUnavailable`: a 503 from the API, one line and
    exit 1 from the CLI."""
    try:
        async with asyncio.timeout(timeout_s):
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
                interceptors=tracing.client_interceptors(),
            )
    except (RuntimeError, RPCError, TimeoutError) as exc:
        raise TemporalUnavailable(
            f"cannot reach Temporal at {settings.temporal_address}: {exc or 'timed out'}"
        ) from exc
