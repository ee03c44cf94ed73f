"""The OpenAPI schema of the live app, fuzzed by schemathesis: no request makes a 5xx, and the
server's output never carries a token, secret or signature.

The app runs as `billing serve` in its own process (configured from the environment only, as in
production) against the suite's MongoDB and Temporal servers.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from stripe_payloads import sign
from temporalio.client import Client

from billing.config import Settings
from starter.embedded import find_binary, free_port

TOKEN = "live-token-3f9c2a"
WEBHOOK_SECRET = "whsec_live_8d41e7"
PORTAL_SECRET = "portal-live-key-6a1f0c9e2b7d4a3f8e5c"
START_TIMEOUT_S = 30.0
EXAMPLES_PER_OPERATION = 30


@dataclass
class LiveServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def live_server(
    settings: Settings, temporal_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`billing serve` on a free port of 127.0.0.1, its settings from the environment only."""
    port = free_port()
    log = tmp_path_factory.mktemp("live") / "serve.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
    env.update({
        "MONGODB_URI": settings.mongodb_uri,
        "MONGODB_DB": settings.mongodb_db,
        "TEMPORAL_ADDRESS": temporal_client.service_client.config.target_host,
        "TEMPORAL_TASK_QUEUE": f"billing-live-{uuid.uuid4().hex[:8]}",
        "BILLING_API_TOKEN": TOKEN,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BILLING_PORTAL_SECRET": PORTAL_SECRET,
        # Checkouts reach the session's Stripe fake.
        "STRIPE_API_KEY": settings.stripe_api_key,
        "STRIPE_API_BASE": settings.stripe_api_base or "",
    })
    with log.open("wb") as out:
        process = subprocess.Popen(
            [find_binary("billing"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    server = LiveServer(url=f"http://127.0.0.1:{port}", log=log, process=process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"billing serve exited with {process.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"billing serve not up within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fuzz(operation: Any, mode: GenerationMode, base_url: str) -> str | None:
    """Up to `EXAMPLES_PER_OPERATION` requests to one operation; the first failure, if any."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        case.validate_response(response, checks=[not_a_server_error], headers=headers)

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, operation.label
        return None  # an operation without parameters has no invalid request to make
    except Exception as exc:
        return f"{operation.label} ({mode.value}): {exc}"
    return None


def test_no_operation_answers_a_server_error(live_server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation of the schema loads
        operations.append(result.ok())
    labels = {operation.label for operation in operations}
    assert {"POST /stripe/webhook", "PUT /v1/orgs/{org}", "POST /v1/usage",
            "GET /v1/orgs/{org}/ledger", "GET /v1/stripe-events/{event_id}",
            "POST /v1/orgs/{org}/holds", "DELETE /v1/orgs/{org}/holds/{hold_id}"} <= labels
    failures = [
        failure
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if (failure := fuzz(operation, mode, live_server.url)) is not None
    ]
    assert failures == [], "\n\n".join(failures)
    assert live_server.process.poll() is None
    answered = re.findall(r'HTTP/1.1" (\d{3})', live_server.output())
    assert len(answered) >= 10 * len(operations)  # the examples were sent
    assert [status for status in answered if status.startswith("5")] == []


def test_the_live_server_logs_no_secret_token_or_signature(live_server: LiveServer) -> None:
    """Its output after the fuzzing (every request carried the token) and refused requests:
    the production log configuration and uvicorn's access log."""
    body = b'{"id": "evt_live", "type": "invoice.paid", "created": 1, "data": {"object": {}}}'
    forged = sign(body, "whsec_attacker_5b7e")
    real = sign(body, WEBHOOK_SECRET)
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        assert client.post("/stripe/webhook", content=body,
                           headers={"Stripe-Signature": forged}).status_code == 400
        assert client.post("/stripe/webhook", content=body + b" ",
                           headers={"Stripe-Signature": real}).status_code == 400
        assert client.get("/v1/orgs/acme/balance",
                          headers={"Authorization": "Bearer wrong-live-token"}).status_code == 401
        operator = {"Authorization": f"Bearer {TOKEN}"}
        assert client.put("/v1/orgs/acme-live", headers=operator).status_code in (200, 201)
        customer = client.post("/v1/orgs/acme-live/tokens", json={"scopes": ["read"]},
                               headers=operator).json()["token"]
        assert client.get("/v1/orgs/acme-live/meter",
                          headers={"Authorization": f"Bearer {customer}"}).status_code == 200
        assert client.get("/portal").status_code == 200
    output = live_server.output()
    assert "/stripe/webhook" in output and "SIGNATURE_INVALID" in output, output[-2000:]
    assert "/v1/orgs/acme-live/tokens" in output and "/portal" in output
    for secret in (TOKEN, WEBHOOK_SECRET, "whsec_attacker_5b7e", "wrong-live-token",
                   forged.split("v1=")[1], real.split("v1=")[1], PORTAL_SECRET, customer,
                   customer.split(".")[2]):
        assert secret not in output
