"""OpenTelemetry tracing: a Stripe webhook's HTTP request, the workflow it starts, the workflow's
activities and their MongoDB commands, in one trace.

Off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not true: then no tracer provider,
no Temporal interceptor, no middleware, and OpenTelemetry's SDK is not even imported. The
exporter (OTLP over HTTP) reads the other standard `OTEL_EXPORTER_OTLP_*` variables itself;
`OTEL_SERVICE_NAME` names the process, else `billing-api`, `billing-worker` or `billing-dev`.

Three maintained pieces do the work: the FastAPI instrumentation (a server span per request),
Temporal's `TracingInterceptor` (client and worker: the trace context travels in the workflow's
and activities' headers) and the PyMongo instrumentation (a client span per command, from
PyMongo's command monitoring, which the async API shares).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from temporalio.client import Interceptor

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
#: Probes and scrapes are not worth a trace each; `OTEL_PYTHON_FASTAPI_EXCLUDED_URLS` overrides.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"

_provider: TracerProvider | None = None


def configured() -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not disabled."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def instrument_mongodb() -> None:
    """Trace MongoDB commands when tracing is configured. PyMongo clients copy the global
    command listeners when they are built, so this runs before the process's first client;
    the spans go to the tracer provider that `setup_tracing` installs later."""
    if not configured():
        return
    from opentelemetry.instrumentation.pymongo import PymongoInstrumentor

    instrumentor = PymongoInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def setup_tracing(default_service: str) -> bool:
    """Install the process's tracer provider (OTLP exporter) when tracing is configured.

    Idempotent: the first call names the service. Returns whether tracing is on."""
    global _provider
    if _provider is not None:
        return True
    if not configured():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME", "").strip() or default_service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    instrument_mongodb()
    _provider = provider
    return True


def flush() -> None:
    """Export the spans the batch processor holds. For processes that end on a re-raised signal
    (uvicorn), where the SDK's exit hook does not run."""
    if _provider is not None:
        _provider.force_flush()


def shutdown_tracing() -> None:
    """Export what is buffered and stop tracing in this process (new clients, apps and MongoDB
    commands are no longer traced)."""
    global _provider
    if _provider is None:
        return
    from opentelemetry.instrumentation.pymongo import PymongoInstrumentor

    PymongoInstrumentor().uninstrument()
    _provider.shutdown()
    _provider = None


def client_interceptors() -> list[Interceptor]:
    """The Temporal client's interceptors: the tracing one when tracing is on, else none. Workers
    built on that client use it too (workflow and activity spans)."""
    if _provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]


def instrument_app(app: FastAPI, default_service: str = "billing-api") -> None:
    """A server span for every request of `app` (the root of a webhook's trace), when tracing is
    on; sets tracing up first if this process has not."""
    if not setup_tracing(default_service):
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    excluded = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", EXCLUDED_URLS)
    FastAPIInstrumentor.instrument_app(app, excluded_urls=excluded)
