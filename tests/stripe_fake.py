"""A small Stripe API fake on 127.0.0.1 and the fixtures that run the engine against it.

It answers what `localstripe` lacks (subscription retrieval with items, refunds listed by charge,
Checkout sessions listed by payment intent, checkout line items, invoice lines and payments,
events listed by creation time and type), creates PaymentIntents with a programmed outcome per
customer or payment method (honouring `Idempotency-Key`), and can answer 500 on demand.
`conftest.py` shares its fixtures with every test module.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from temporalio.client import Client
from temporalio.worker import Worker

from billing.runtime import Runtime
from billing.store.database import Database
from starter.api.app import create_app
from starter.embedded import free_port
from worker import build_worker

Obj = dict[str, Any]

__all__ = ["APP_NAME", "StripeFake", "api", "line_item", "stripe_fake", "stripe_runtime",
           "stripe_worker"]


def line_item(price: str, *, quantity: int = 1, amount_total: int = 4900) -> Obj:
    """A Checkout line item as `GET /v1/checkout/sessions/{id}/line_items` lists it."""
    return {"id": f"li_{uuid.uuid4().hex[:16]}", "object": "item", "price": {"id": price},
            "quantity": quantity, "amount_total": amount_total, "amount_subtotal": amount_total}


class StripeFake:
    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.refunds: dict[str, list[Obj]] = {}
        self.line_items: dict[str, list[Obj]] = {}
        self.events: list[Obj] = []
        #: What confirming a PaymentIntent does, by payment method or customer id:
        #: `succeeded` (the default), `declined` (402 card_declined) or `requires_action`.
        self.outcomes: dict[str, str] = {}
        #: Every PaymentIntent created, in order (a request repeating an idempotency key adds none).
        self.intents: list[Obj] = []
        self._idempotent: dict[str, tuple[int, Obj]] = {}
        self.fail_with: int | None = None
        self.calls: Counter[str] = Counter()
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, obj: Obj) -> Obj:
        self.objects[obj["id"]] = obj
        return obj

    def checkout(self, session: Obj, lines: list[Obj] | None = None) -> Obj:
        """Serve a Checkout session and its line items (by default one line of the 500k pack for
        the session's total), as Stripe keeps them once the customer paid."""
        self.add(session)
        self.line_items[session["id"]] = lines if lines is not None else [
            line_item("price_pack_500k", amount_total=int(session.get("amount_total") or 4900))]
        return session

    def customer(self, customer_id: str, *, outcome: str = "succeeded",
                 default_method: bool = True) -> str:
        """A customer with one card (its default payment method unless `default_method` is
        false), whose off-session payments end as `outcome`; the card's id."""
        method = f"pm_{uuid.uuid4().hex[:16]}"
        self.add({"id": method, "object": "payment_method", "type": "card",
                  "customer": customer_id, "card": {"brand": "visa", "last4": "4242"}})
        self.add({"id": customer_id, "object": "customer", "invoice_settings": {
            "default_payment_method": method if default_method else None}})
        self.outcomes[customer_id] = outcome
        return method

    def intents_of(self, customer_id: str) -> list[Obj]:
        return [pi for pi in self.intents if pi["customer"] == customer_id]

    def _create_intent(self, form: dict[str, str], key: str | None) -> web.Response:
        if key is not None and key in self._idempotent:
            status, body = self._idempotent[key]
            return web.json_response(body, status=status)
        customer, method = form.get("customer"), form.get("payment_method")
        outcome = self.outcomes.get(method or "") or self.outcomes.get(customer or "",
                                                                        "succeeded")
        amount = int(form["amount"])
        pi = f"pi_{uuid.uuid4().hex[:20]}"
        intent: Obj = {
            "id": pi, "object": "payment_intent", "amount": amount,
            "amount_received": amount if outcome == "succeeded" else 0,
            "currency": form.get("currency", "usd"), "customer": customer,
            "payment_method": method, "created": int(time.time()), "invoice": None,
            "latest_charge": f"ch_{uuid.uuid4().hex[:20]}" if outcome == "succeeded" else None,
            "metadata": {k[len("metadata["):-1]: v for k, v in form.items()
                         if k.startswith("metadata[")},
            "status": {"succeeded": "succeeded", "requires_action": "requires_action"}.get(
                outcome, "requires_payment_method"),
        }
        self.intents.append(self.add(intent))
        status, body = (200, intent) if outcome != "declined" else (402, {"error": {
            "type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
            "message": "Your card was declined.", "payment_intent": intent}})
        if key is not None:
            self._idempotent[key] = (status, body)
        return web.json_response(body, status=status)

    @staticmethod
    def _list(url: str, data: list[Obj]) -> web.Response:
        return web.json_response({"object": "list", "url": url, "has_more": False, "data": data})

    @staticmethod
    def _missing(what: str) -> web.Response:
        return web.json_response(
            {"error": {"type": "invalid_request_error", "code": "resource_missing",
                       "message": f"No such {what}"}}, status=404)

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.calls[path] += 1
        if self.fail_with is not None:
            return web.json_response(
                {"error": {"type": "api_error", "message": "injected failure"}},
                status=self.fail_with)
        parts = path.strip("/").split("/")
        if parts == ["v1", "events"]:
            return self._events(request)
        if parts == ["v1", "payment_intents"] and request.method == "POST":
            form = {k: str(v) for k, v in (await request.post()).items()}
            return self._create_intent(form, request.headers.get("Idempotency-Key"))
        if parts == ["v1", "payment_methods"]:
            customer = request.query.get("customer")
            return self._list(path, [o for o in self.objects.values()
                                     if o.get("object") == "payment_method"
                                     and o.get("customer") == customer])
        if parts == ["v1", "checkout", "sessions"]:
            pi = request.query.get("payment_intent")
            return self._list(path, [o for o in self.objects.values()
                                     if o.get("object") == "checkout.session"
                                     and o.get("payment_intent") == pi])
        if parts == ["v1", "invoice_payments"]:
            invoice = request.query.get("invoice")
            return self._list(path, [o for o in self.objects.values()
                                     if o.get("object") == "invoice_payment"
                                     and o.get("invoice") == invoice])
        if len(parts) == 4 and parts[:2] == ["v1", "invoices"] and parts[3] == "lines":
            invoice = self.objects.get(parts[2])
            if invoice is None:
                return self._missing(parts[2])
            return self._list(path, invoice.get("lines", {}).get("data", []))
        if parts == ["v1", "refunds"]:
            charge = request.query.get("charge", "")
            return self._list(path, self.refunds.get(charge, []))
        if len(parts) == 5 and parts[:3] == ["v1", "checkout", "sessions"] \
                and parts[4] == "line_items":
            items = self.line_items.get(parts[3])
            return self._list(path, items) if items is not None else self._missing(parts[3])
        if len(parts) == 3 and parts[0] == "v1" and parts[2] in self.objects:
            return web.json_response(self.objects[parts[2]])
        return self._missing(path)

    def _events(self, request: web.Request) -> web.Response:
        """`GET /v1/events`: newest first, `created[gte]`, `types[]`, `starting_after`, `limit`."""
        query = request.query
        since = int(query.get("created[gte]", 0))
        types = {v for k, v in query.items() if k.startswith("types[")}
        found = [e for e in reversed(self.events)
                 if e["created"] >= since and (not types or e["type"] in types)]
        found.sort(key=lambda e: -int(e["created"]))  # stable: newest added first within a second
        after = query.get("starting_after")
        if after is not None:
            found = found[[e["id"] for e in found].index(after) + 1:]
        limit = int(query.get("limit", 10))
        return web.json_response({"object": "list", "url": request.path,
                                  "has_more": len(found) > limit, "data": found[:limit]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="session")
async def stripe_fake() -> AsyncIterator[StripeFake]:
    fake = StripeFake()
    await fake.start()
    yield fake
    await fake.stop()


#: The engine's MongoDB client names itself so a `failCommand` fail point can target it alone.
APP_NAME = "billing-stripe-tests"


@pytest.fixture(scope="session")
async def stripe_runtime(runtime: Runtime, stripe_fake: StripeFake) -> AsyncIterator[Runtime]:
    """The session's runtime with the Stripe API at the fake, on a task queue of its own."""
    settings = runtime.settings.model_copy(update={
        "stripe_api_base": stripe_fake.url,
        "temporal_task_queue": f"billing-stripe-{uuid.uuid4().hex[:8]}",
    })
    db = Database(settings.mongodb_uri, settings.mongodb_db, appname=APP_NAME)
    yield Runtime(settings=settings, config=runtime.config, db=db)
    await db.close()


@pytest.fixture(scope="session")
async def stripe_worker(temporal_client: Client, stripe_runtime: Runtime) -> AsyncIterator[Worker]:
    """The real worker (every workflow and activity) on that task queue."""
    async with build_worker(temporal_client, stripe_runtime) as running:
        yield running


@pytest.fixture(scope="session")
async def api(stripe_runtime: Runtime, temporal_client: Client) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app in process: `POST /stripe/webhook` and the `/v1` reads."""
    app = create_app(stripe_runtime, temporal_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                 headers={"Authorization": "Bearer test-token"}) as client:
        yield client
