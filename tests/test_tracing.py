"""Tracing (`starter/tracing.py`): a signed webhook is one trace from the HTTP request through the
workflow and its activities to MongoDB, exported over OTLP/HTTP to a receiver on 127.0.0.1; with
no OTLP endpoint configured, nothing is installed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from stripe_payloads import deliver, event, metadata, new_id, payment_intent
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor

import worker
from billing.models import StripeEventOutcome
from billing.runtime import Runtime
from billing.store.database import Database
from starter import tracing
from starter.api.app import create_app
from starter.embedded import find_binary, free_port, terminate, wait_for_port
from starter.temporal_client import connect

ROOT = Path(__file__).resolve().parent.parent
OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME")


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: keeps every export request it is sent."""

    url: str
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)

    def spans(self) -> list[tuple[str, Span]]:
        """(service name, span) for every span received."""
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = attributes(resource_spans.resource.attributes)["service.name"]
                for scope_spans in resource_spans.scope_spans:
                    found.extend((service, span) for span in scope_spans.spans)
        return found


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.fixture
def otlp() -> Iterator[Receiver]:
    """In a thread of its own: the exporter posts synchronously from the flushing thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.requests.append(ExportTraceServiceRequest.FromString(body))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/v1/traces")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def temporal_address(client: Client) -> str:
    return client.service_client.config.target_host


async def test_a_webhook_is_one_trace_from_request_to_mongodb(
    no_otel_env, monkeypatch, otlp: Receiver, stripe_runtime: Runtime, temporal_client, org
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.url)
    assert tracing.setup_tracing("billing-api")
    settings = stripe_runtime.settings.model_copy(update={
        "temporal_address": temporal_address(temporal_client),
        "temporal_task_queue": f"billing-traced-{uuid.uuid4().hex[:8]}",
    })
    db = Database(settings.mongodb_uri, settings.mongodb_db)  # built after the command tracer
    runtime = Runtime(settings=settings, config=stripe_runtime.config, db=db)
    evt = event("payment_intent.succeeded",
                payment_intent(pi=new_id("pi"), meta=metadata(org, "pack_500k")))
    workflow_id = f"stripe-{evt['id']}"
    try:
        client = await connect(settings)
        assert [type(i) for i in client.config()["interceptors"]] == [TracingInterceptor]
        app = create_app(runtime, client)
        async with worker.build_worker(client, runtime), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api"
        ) as api:
            response = await deliver(api, evt)
            assert response.json() == {"status": "started", "workflow_id": workflow_id}
            handle = client.get_workflow_handle(workflow_id, result_type=StripeEventOutcome)
            assert (await handle.result()).outcome == "applied"
    finally:
        tracing.shutdown_tracing()  # exports what the batch processor holds
        await db.close()

    spans = otlp.spans()
    assert {service for service, _ in spans} == {"billing-api"}
    requests = [span for _, span in spans
                if span.kind == Span.SPAN_KIND_SERVER and "/stripe/webhook" in span.name]
    assert len(requests) == 1, [span.name for _, span in spans]
    trace_id = requests[0].trace_id
    in_trace = [span for _, span in spans if span.trace_id == trace_id]
    names = {span.name for span in in_trace}
    assert {"StartWorkflow:StripeEventWorkflow", "RunWorkflow:StripeEventWorkflow"} <= names
    activities = {span.span_id: span.name for span in in_trace
                  if span.name.startswith("RunActivity:")}
    assert {"RunActivity:read_and_apply_stripe_purchase"} <= set(
        activities.values())
    commands = [span for span in in_trace
                if attributes(span.attributes).get("db.system") == "mongodb"]
    # The ledger transaction of the purchase, under the activity that wrote it.
    written = {activities[span.parent_span_id] for span in commands
               if span.parent_span_id in activities and span.name.endswith(".insert")}
    assert "RunActivity:read_and_apply_stripe_purchase" in written, sorted(names)
    # Nothing of this workflow's run was left out of the request's trace.
    assert not [span.name for _, span in spans if span.trace_id != trace_id
                and span.name.startswith(("RunWorkflow:", "StartActivity:", "RunActivity:"))]


async def test_billing_serve_traces_requests_and_their_mongodb_commands(
    otlp: Receiver, stripe_runtime: Runtime, org
):
    """The production command: MongoDB's command tracer is registered before its client."""
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("OTEL_", "MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
    env |= {"MONGODB_URI": stripe_runtime.settings.mongodb_uri,
            "MONGODB_DB": stripe_runtime.settings.mongodb_db, "BILLING_API_TOKEN": "t",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url.removesuffix("/v1/traces"),
            "OTEL_SERVICE_NAME": "billing-api-traced"}
    serve = await asyncio.create_subprocess_exec(
        find_binary("billing"), "serve", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_for_port(port, "billing serve", process=serve)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            registered = await http.put(f"/v1/orgs/{org}", headers={"Authorization": "Bearer t"})
            assert registered.status_code == 201
    finally:
        await terminate(serve, grace_s=30)  # exports what is buffered on the way out

    spans = otlp.spans()
    assert {service for service, _ in spans} == {"billing-api-traced"}
    [request] = [span for _, span in spans if span.kind == Span.SPAN_KIND_SERVER]
    assert request.name == "PUT /v1/orgs/{org}"  # /healthz is not traced
    commands = {span.name.split(".")[-1] for _, span in spans
                if attributes(span.attributes).get("db.system") == "mongodb"
                and span.trace_id == request.trace_id}
    assert {"find", "insert", "commitTransaction"} <= commands


async def test_without_an_endpoint_nothing_is_installed(
    no_otel_env, stripe_runtime: Runtime, temporal_client
):
    provider = trace.get_tracer_provider()
    assert not tracing.setup_tracing("billing-api")
    assert tracing.client_interceptors() == []
    settings = stripe_runtime.settings.model_copy(
        update={"temporal_address": temporal_address(temporal_client)})
    client = await connect(settings)
    assert client.config()["interceptors"] == []
    app = create_app(Runtime(settings=settings, config=stripe_runtime.config,
                             db=stripe_runtime.db), client)
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert trace.get_tracer_provider() is provider


OPENTELEMETRY_LOADED = """
import sys
from starter import telemetry, tracing
telemetry.enable_sdk_metrics()
print(tracing.setup_tracing("billing-api"),
      sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.inst"))))
"""


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "False []"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
     "False []"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, "False []"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "True"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces",
      "OTEL_SDK_DISABLED": "false"}, "True"),
])
def test_the_sdk_is_loaded_only_when_an_endpoint_is_configured(env, expected):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", OPENTELEMETRY_LOADED], cwd=ROOT, text=True,
                         env=clean | env, capture_output=True, check=True).stdout.strip()
    if expected == "True":
        assert out.startswith("True ['opentelemetry.instrumentation")
        assert "opentelemetry.instrumentation.pymongo" in out
    else:
        assert out == expected
