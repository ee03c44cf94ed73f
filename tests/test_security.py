"""Security: constant-time token comparison, secrets from the environment only and never in a
log line, and no MongoDB query operator smuggled through any input."""

from __future__ import annotations

import hmac
import inspect
import io
import json
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main
from pymongo import monitoring
from stripe_payloads import (
    PRIMARY_SECRET,
    ROTATED_SECRET,
    charge,
    checkout_session,
    deliver,
    dispute,
    event,
    invoice,
    metadata,
    new_id,
    payment_intent,
    refund,
    sign,
    subscription,
)
from temporalio.client import Client
from victims import Victim, snapshot

from billing.config import EXAMPLE_CONFIG, ConfigError, Settings, parse_config
from billing.logs import configure_logging
from billing.models import StripeEventOutcome
from billing.runtime import Runtime
from billing.store.database import Database
from starter.api import deps
from starter.api.app import create_app
from starter.cli import app as cli_app
from worker import build_worker

Obj = dict[str, Any]
PACK = "pack_500k"


# ---- bearer tokens -----------------------------------------------------------------------------


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, object]]:
    """Every `hmac.compare_digest` call, passed through to the real one."""
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


@pytest.fixture
async def http_for(runtime: Runtime) -> AsyncIterator[Any]:
    """An HTTP client on an app built from `runtime` with the given settings changes."""
    clients: list[httpx.AsyncClient] = []

    def make(**changes: str) -> httpx.AsyncClient:
        settings = runtime.settings.model_copy(update=changes)
        app = create_app(Runtime(settings=settings, config=runtime.config, db=runtime.db))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_rotated_tokens_are_all_accepted_and_each_compared_in_constant_time(
    http_for: Any, compared: list[tuple[object, object]], monkeypatch: pytest.MonkeyPatch,
    org: str,
) -> None:
    monkeypatch.setenv("BILLING_API_TOKEN", "tok-old-1a2b, tok-new-3c4d ,tok-ops-5e6f")
    tokens = Settings().api_tokens
    assert tokens == ("tok-old-1a2b", "tok-new-3c4d", "tok-ops-5e6f")
    client = http_for(billing_api_token=Settings().billing_api_token)
    path = f"/v1/orgs/{org}/balance"  # 404 once past the token: the org is not registered
    for presented, status in [*((t, 404) for t in tokens),
                              ("tok-old-1a2", 401), ("tok-old-1a2bX", 401),
                              ("TOK-OLD-1A2B", 401), ("tok-old-1a2b,tok-new-3c4d", 401)]:
        compared.clear()
        response = await client.get(path, headers={"Authorization": f"Bearer {presented}"})
        assert response.status_code == status, presented
        # Every configured token is compared, whichever matches (no early exit), and only
        # through hmac.compare_digest.
        assert compared == [(presented.encode(), t.encode()) for t in tokens], presented


def test_require_token_uses_compare_digest_and_no_early_exit() -> None:
    source = inspect.getsource(deps.require_token)
    assert "hmac.compare_digest(" in source
    shortcuts = (r"==", r"!=", r"\bbreak\b", r"\bany\(", r"\ball\(",
                 r"\bif\b[^\n]*\bin\b[^\n]*api_tokens")
    for shortcut in shortcuts:
        assert not re.search(shortcut, source), shortcut


async def test_webhook_signatures_are_compared_in_constant_time(
    api: httpx.AsyncClient, compared: list[tuple[object, object]]
) -> None:
    evt = event("plan.created", {"id": "price_x", "object": "plan", "metadata": {}})
    response = await deliver(api, evt, secret=ROTATED_SECRET)
    assert response.json()["status"] == "ignored"
    # The primary secret's expected signature, then the rotated one's, each in constant time.
    assert len(compared) >= 2


# ---- secrets from the environment only ---------------------------------------------------------


SECRET_VARIABLES = ("BILLING_API_TOKEN", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_KEY")


def test_secrets_are_read_from_the_environment_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in SECRET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "BILLING_API_TOKEN=from-dotenv\nSTRIPE_WEBHOOK_SECRET=whsec_dotenv\n"
        "STRIPE_API_KEY=sk_test_dotenv\n")
    assert Settings.model_config.get("env_file") is None
    assert Settings.model_config.get("secrets_dir") is None
    unset = Settings()
    assert (unset.api_tokens, unset.webhook_secrets, unset.stripe_api_key) == ((), (), "")

    monkeypatch.setenv("BILLING_API_TOKEN", "tok-a,tok-b")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_a, whsec_b")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_env")
    chosen = Settings()
    assert chosen.api_tokens == ("tok-a", "tok-b")
    assert chosen.webhook_secrets == ("whsec_a", "whsec_b")
    assert chosen.stripe_api_key == "sk_test_env"


@pytest.mark.parametrize("key", ["stripe_webhook_secret", "billing_api_token", "stripe_api_key"])
def test_the_config_file_cannot_hold_a_secret(key: str) -> None:
    text = f'{key} = "whsec_in_a_file"\n' + EXAMPLE_CONFIG.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match=key):
        parse_config(text)


def test_no_cli_option_takes_a_secret() -> None:
    """No parameter of any command is named for a secret (`billing token` makes a customer
    token; none of its parameters takes one)."""
    def params(command: Any) -> Iterator[tuple[str, str]]:
        for param in command.params:
            yield command.name, f"{param.name} {' '.join(getattr(param, 'opts', []))}"
        for sub in getattr(command, "commands", {}).values():
            yield from params(sub)

    found = list(params(typer.main.get_command(cli_app)))
    assert len(found) > 20
    assert ("token", "purchase --purchase") in found
    assert [p for p in found if re.search(r"token|secret|api.?key|password", p[1], re.I)] == []


# ---- logs ------------------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log record of the process, at DEBUG, as the JSON lines production writes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("DEBUG")
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    root.handlers, root.level = handlers, level


def signature_of(header: str) -> str:
    return header.split("v1=", 1)[1]


async def test_no_secret_token_or_signature_reaches_the_logs(
    api: httpx.AsyncClient, stripe_worker: Any, temporal_client: Client, log_lines: io.StringIO,
    org: str,
) -> None:
    evt = event("payment_intent.succeeded",
                payment_intent(pi=new_id("pi"), meta=metadata(org, PACK)))
    body = json.dumps(evt).encode()
    headers = {
        "forged": sign(body, "whsec_attacker_77aa"),
        "stale": sign(body, PRIMARY_SECRET, int(time.time()) - 600),
        "tampered": sign(body + b" "),
    }
    for header in headers.values():
        response = await api.post("/stripe/webhook", content=body,
                                  headers={"Stripe-Signature": header})
        assert response.status_code == 400
        assert signature_of(header) not in response.text
    wrong = await api.get(f"/v1/orgs/{org}/balance",
                          headers={"Authorization": "Bearer wrong-token-9z8y"})
    assert wrong.status_code == 401 and "wrong-token-9z8y" not in wrong.text
    valid = sign(body)
    accepted = await api.post("/stripe/webhook", content=body, headers={"Stripe-Signature": valid})
    assert accepted.json()["status"] == "started"
    handle = temporal_client.get_workflow_handle(f"stripe-{evt['id']}",
                                                 result_type=StripeEventOutcome)
    assert (await handle.result()).outcome == "applied"  # the worker's lines are in too

    text = log_lines.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any("SIGNATURE_INVALID" in str(line) for line in lines), text[:2000]
    assert any("SIGNATURE_EXPIRED" in str(line) for line in lines), text[:2000]
    for secret in (PRIMARY_SECRET, ROTATED_SECRET, "whsec_attacker_77aa", "test-token",
                   "wrong-token-9z8y", "sk_test_billing", signature_of(valid),
                   *(signature_of(h) for h in headers.values())):
        assert secret not in text


# ---- no operator smuggled into a query ---------------------------------------------------------

#: Query operators as a hostile client would put them in JSON; the sentinel tells them apart
#: from the engine's own operators.
OPERATORS: list[Obj] = [
    {"$ne": "smuggled"}, {"$gt": "smuggled"}, {"$regex": "^smuggled"}, {"$where": "smuggled"},
    {"$in": ["smuggled"]},
]


class CommandLog(monitoring.CommandListener):
    """Every command the engine's client sends to MongoDB."""

    def __init__(self) -> None:
        self.commands: list[Obj] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def smuggled(self) -> list[object]:
        """Sub-documents equal to a hostile operator, and field names made from input."""
        found: list[object] = []

        def walk(node: object) -> None:
            if isinstance(node, dict):
                if node in OPERATORS:
                    found.append(node)
                found.extend(key for key in node if "smuggled" in str(key))
                for value in node.values():
                    walk(value)
            elif isinstance(node, list | tuple):
                for value in node:
                    walk(value)

        for command in self.commands:
            walk(command)
        return found


@dataclass
class Spied:
    api: httpx.AsyncClient
    log: CommandLog
    db: Database
    client: Client


@pytest.fixture(scope="module")
async def spied(
    stripe_runtime: Runtime, temporal_client: Client
) -> AsyncIterator[Spied]:
    """The app and a worker whose MongoDB client reports every command it sends."""
    log = CommandLog()
    settings = stripe_runtime.settings.model_copy(
        update={"temporal_task_queue": f"billing-spied-{uuid.uuid4().hex[:8]}"})
    db = Database(settings.mongodb_uri, settings.mongodb_db, event_listeners=[log])
    runtime = Runtime(settings=settings, config=stripe_runtime.config, db=db)
    app = create_app(runtime, temporal_client)
    async with (
        build_worker(temporal_client, runtime),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://spied",
                          headers={"Authorization": "Bearer test-token"}) as client,
    ):
        yield Spied(api=client, log=log, db=db, client=temporal_client)
    await db.close()


async def test_the_detector_sees_a_smuggled_operator(spied: Spied) -> None:
    spied.log.commands.clear()
    await spied.db.accounts.find_one({"_id": OPERATORS[0]})
    await spied.db.accounts.find_one({"smuggled.b": 1})
    assert spied.log.smuggled() == [OPERATORS[0], "smuggled.b"]


def quoted(value: object) -> str:
    return urllib.parse.quote(value if isinstance(value, str) else json.dumps(value), safe="")


ORG_PATHS = ["", "/balance", "/ledger", "/meter", "/quota", "/subscription", "/notifications",
             "/holds"]


@pytest.mark.parametrize("hostile", [*OPERATORS, "$where", "a.$ne", "smuggled.$gt"],
                         ids=lambda value: json.dumps(value))
async def test_no_operator_through_the_http_api(
    spied: Spied, victim: Victim, db: Database, hostile: object
) -> None:
    before = await snapshot(db)
    spied.log.commands.clear()
    requests: list[tuple[str, str, Obj | None]] = [
        ("PUT" if not suffix else "GET", f"/v1/orgs/{quoted(hostile)}{suffix}", None)
        for suffix in ORG_PATHS
    ]
    requests += [
        ("GET", f"/v1/orgs/{victim.org}/ledger?cursor={quoted(hostile)}", None),
        ("GET", f"/v1/stripe-events/{quoted(hostile)}", None),
    ]
    body: Obj = {"org_id": victim.org, "run_id": "smuggle-run", "units": 1}
    for field in ("org_id", "run_id", "step", "units", "costs", "hold_id"):
        requests.append(("POST", "/v1/usage", {**body, field: hostile}))
    for field in ("hold_id", "units", "costs", "ttl_seconds"):
        requests.append(("POST", f"/v1/orgs/{victim.org}/holds", {"hold_id": "h", field: hostile}))
    requests += [("POST", f"/v1/orgs/{quoted(hostile)}/holds", {"hold_id": "h"}),
                 ("DELETE", f"/v1/orgs/{victim.org}/holds/{quoted(hostile)}", None)]
    requests.append(("POST", "/v1/usage", {**body, "units": None, "costs": {"llm": hostile}}))
    for method, path, payload in requests:
        response = await spied.api.request(method, path, json=payload)
        assert 400 <= response.status_code < 500, (method, path, payload, response.text)
        assert set(response.json()) == {"error"}
    assert spied.log.smuggled() == []
    assert await snapshot(db) == before


def _operator_events(v: Victim, op: Obj) -> list[tuple[str, Obj]]:
    """Signed events with `op` where an organization, pack or Stripe id belongs."""
    pi, ch, cus = new_id("pi"), new_id("ch"), new_id("cus")
    with_id = payment_intent(pi=pi, meta=metadata(v.org, PACK))
    with_id["id"] = op
    refunded = charge(ch=ch, pi=None, refunds=[refund(charge=ch, pi=None, amount=4900)])
    refunded["id"] = op
    unnamed_customer = payment_intent(pi=pi, meta={"pack_id": PACK})
    unnamed_customer["customer"] = op
    unnamed_sub = subscription(sub=new_id("sub"), customer=cus, price="price_pro_monthly")
    unnamed_sub["customer"] = op
    sub_checkout = checkout_session(payment_intent=None, meta=metadata(v.org), mode="subscription",
                                    customer=cus)
    sub_checkout["subscription"] = op
    refund_of = refund(charge=ch, pi=pi, amount=4900) | {"charge": op, "payment_intent": op}
    disputed = dispute(dp=new_id("dp"), ch=ch, pi=pi, amount=4900, status="lost") | {
        "charge": op, "payment_intent": op}
    failed = invoice(customer=cus, sub=None) | {"customer": op, "subscription": op}
    return [
        ("metadata org_id", event("payment_intent.succeeded", payment_intent(
            pi=pi, meta={"org_id": op, "pack_id": PACK}))),
        ("metadata organizationId", event("payment_intent.succeeded", payment_intent(
            pi=pi, meta={"organizationId": op, "packId": PACK}))),
        ("payment intent id", event("payment_intent.succeeded", with_id)),
        ("payment intent customer", event("payment_intent.succeeded", unnamed_customer)),
        ("checkout subscription", event("checkout.session.completed", sub_checkout)),
        ("charge id", event("charge.refunded", refunded)),
        ("refund charge", event("refund.created", refund_of)),
        ("dispute charge", event("charge.dispute.funds_withdrawn", disputed)),
        ("deleted customer id", event("customer.deleted",
                                      {"id": op, "object": "customer", "metadata": {}})),
        ("subscription customer", event("customer.subscription.updated", unnamed_sub)),
        ("invoice customer", event("invoice.payment_failed", failed)),
    ]


@pytest.mark.parametrize("op", OPERATORS, ids=lambda op: json.dumps(op))
async def test_no_operator_through_a_signed_stripe_event(
    spied: Spied, victim: Victim, db: Database, op: Obj
) -> None:
    """Each event reaches `StripeEventWorkflow` and ends `unresolved` or `ignored`, writing
    nothing: the operator never reaches a query, so it cannot match the victim's lot,
    subscription or customer link."""
    before = await snapshot(db)
    spied.log.commands.clear()
    for where, evt in _operator_events(victim, op):
        response = await deliver(spied.api, evt)
        assert response.json()["status"] == "started", (where, response.text)
        handle = spied.client.get_workflow_handle(f"stripe-{evt['id']}",
                                                  result_type=StripeEventOutcome)
        result: StripeEventOutcome = await handle.result()
        assert result.outcome in ("unresolved", "ignored"), (where, result)
        assert result.written == [], (where, result)
    assert spied.log.commands, "the engine's commands were not observed"
    assert spied.log.smuggled() == []
    assert await snapshot(db) == before


async def test_a_dotted_org_id_is_a_value_never_a_field_path(spied: Spied, db: Database) -> None:
    org = f"smuggled.{uuid.uuid4().hex[:8]}"
    spied.log.commands.clear()
    assert (await spied.api.put(f"/v1/orgs/{org}")).status_code == 201
    used = await spied.api.post("/v1/usage", json={"org_id": org, "run_id": "r1", "units": 3})
    assert used.status_code == 200 and used.json()["balance"] == 497
    evt = event("payment_intent.succeeded",
                payment_intent(pi=new_id("pi"), meta=metadata(org, PACK)))
    assert (await deliver(spied.api, evt)).json()["status"] == "started"
    result = await spied.client.get_workflow_handle(
        f"stripe-{evt['id']}", result_type=StripeEventOutcome).result()
    assert (result.outcome, result.org_id) == ("applied", org)
    assert spied.log.smuggled() == []
    assert [doc["_id"] for doc in await db.accounts.find({"_id": {"$regex": "^smuggled"}})
            .to_list()] == [org]
    assert (await spied.api.get(f"/v1/orgs/{org}/balance")).json()["balance"] == 497 + 500000


@pytest.mark.parametrize("event_id", ["evt\u0000x", "evt_é", " ", "evt_" + "x" * 300, "..",
                                      "evt_a%2Fb", "*", "stripe-evt_1"])
async def test_odd_stripe_event_ids_are_not_server_errors(
    api: httpx.AsyncClient, event_id: str
) -> None:
    response = await api.get(f"/v1/stripe-events/{urllib.parse.quote(event_id, safe='')}")
    assert response.status_code in (404, 422), response.text
    assert set(response.json()) == {"error"}

