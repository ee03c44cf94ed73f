"""A small Stripe API on 127.0.0.1: what the engine calls, shaped as Stripe answers it.

`billing dev` runs it when no `STRIPE_API_KEY` is set, and the tests run the engine against it
(real Stripe SDK, real HTTP). It creates customers, Checkout Sessions (with their line items,
priced from the prices it was given) and billing portal sessions, and PaymentIntents with a
programmed outcome per customer or payment method; every create honours `Idempotency-Key` as
Stripe does (the same key answers the first response; other parameters under it are refused).
It serves what the engine reads (subscriptions with items, refunds listed by charge, Checkout
sessions listed by payment intent, line items, invoice lines and payments, events by creation
time and type), and answers chosen paths with an error on demand.

Stripe's hosted pages have a stand-in: `GET /c/pay/<cs>` shows the session and `POST` to it pays
(`complete_checkout`), as a customer paying on Checkout would; with `webhook` set, the fake then
delivers the signed `checkout.session.completed` event, as Stripe does.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import stripe
from aiohttp import web

from billing.config import BillingConfig

Obj = dict[str, Any]

#: How long a Checkout Session stays open (Stripe's default: 24 hours).
SESSION_SECONDS = 24 * 3600
API_KEY = "sk_test_billing_fake"
#: What a plan's Price costs here.
PLAN_CENTS = 2900


@dataclass(frozen=True)
class Webhook:
    """Where the fake delivers the events of what happens on its hosted pages."""

    url: str
    secret: str


def line_item(price: str, *, quantity: int = 1, amount_total: int = 4900) -> Obj:
    """A Checkout line item as `GET /v1/checkout/sessions/{id}/line_items` lists it."""
    return {"id": f"li_{uuid.uuid4().hex[:16]}", "object": "item", "price": {"id": price},
            "quantity": quantity, "amount_total": amount_total, "amount_subtotal": amount_total}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


_KEY_PART = re.compile(r"\[([^\]]*)\]")


def form_params(form: dict[str, str]) -> Obj:
    """Stripe's form encoding read back into objects: `line_items[0][price]=p` ->
    `{"line_items": [{"price": "p"}]}`."""
    root: Obj = {}
    for flat, value in form.items():
        head = flat.split("[", 1)[0]
        path = [head, *_KEY_PART.findall(flat[len(head):])]
        node: Any = root
        for part, following in zip(path, [*path[1:], None], strict=True):
            if following is None:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    params: Obj = _lists(root)
    return params


def _lists(node: Any) -> Any:
    """Objects whose keys are 0, 1, ... are the lists Stripe's encoding flattened."""
    if not isinstance(node, dict):
        return node
    items = {key: _lists(value) for key, value in node.items()}
    if items and all(key.isdigit() for key in items):
        return [items[key] for key in sorted(items, key=int)]
    return items


class StripeFake:
    def __init__(self, port: int, *, state_file: Path | None = None) -> None:
        self.objects: dict[str, Obj] = {}
        self.refunds: dict[str, list[Obj]] = {}
        self.line_items: dict[str, list[Obj]] = {}
        self.events: list[Obj] = []
        #: Unit amounts in cents and currencies of the Prices Checkout may sell.
        self.prices: dict[str, tuple[int, str]] = {}
        #: What confirming a PaymentIntent does, by payment method or customer id:
        #: `succeeded` (the default), `declined` (402 card_declined) or `requires_action`.
        self.outcomes: dict[str, str] = {}
        #: Every PaymentIntent created, in order (a request repeating an idempotency key adds none).
        self.intents: list[Obj] = []
        #: Every object a POST created, by kind (`customer`, `checkout.session`, ...), in order.
        self.created: dict[str, list[Obj]] = {}
        self._idempotent: dict[str, tuple[str, int, Obj]] = {}
        self._session_data: dict[str, Obj] = {}
        self.fail_with: int | None = None
        #: Paths answered with this status (nothing done), and paths whose request is done but
        #: answered 500 (a response lost on the way back: the retry must not do it twice).
        self.fail_paths: dict[str, int] = {}
        self.lose_response: set[str] = set()
        self.webhook: Webhook | None = None
        self.calls: Counter[str] = Counter()
        self.port = port
        #: Where the objects are kept across restarts (`billing dev`); None: in memory only.
        self.state_file = state_file
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, obj: Obj) -> Obj:
        self.objects[obj["id"]] = obj
        return obj

    def price(self, price_id: str, cents: int, currency: str = "usd") -> None:
        self.prices[price_id] = (cents, currency)

    def sell(self, config: BillingConfig) -> None:
        """Sell every Price of the configured packs (at their price and currency) and plans (the
        configuration prices packs only: a plan costs `PLAN_CENTS`)."""
        for pack in config.packs:
            for price in pack.stripe_price_ids:
                self.price(price, pack.price_cents, pack.currency)
        for plan in config.plans:
            for price in plan.stripe_price_ids:
                self.price(price, PLAN_CENTS)

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

    def complete_checkout(self, session_id: str) -> Obj:
        """The customer paid on Checkout: the session is `complete` and `paid`, with the payment
        intent it made (mode `payment`) or the subscription (mode `subscription`), each carrying
        the metadata the session was created with for it. Returns the session as the
        `checkout.session.completed` event carries it. Paying twice changes nothing."""
        session = self.objects[session_id]
        if session["status"] == "complete":
            return session
        data = self._session_data.get(session_id, {})
        now = int(time.time())
        if session["mode"] == "payment":
            charge = _new_id("ch")
            intent = self.add({
                "id": _new_id("pi"), "object": "payment_intent", "amount": session["amount_total"],
                "amount_received": session["amount_total"], "currency": session["currency"],
                "customer": session["customer"], "status": "succeeded", "created": now,
                "latest_charge": charge, "invoice": None, "livemode": False,
                "metadata": dict((data.get("payment_intent_data") or {}).get("metadata") or {})})
            self.intents.append(intent)
            session["payment_intent"] = intent["id"]
        else:
            items = [{"id": _new_id("si"), "object": "subscription_item",
                      "price": {"id": line["price"]["id"]}, "quantity": line["quantity"],
                      "current_period_start": now}
                     for line in self.line_items[session_id]]
            subscription = self.add({
                "id": _new_id("sub"), "object": "subscription", "customer": session["customer"],
                "status": "active", "created": now, "livemode": False,
                "items": {"object": "list", "has_more": False, "data": items},
                "metadata": dict((data.get("subscription_data") or {}).get("metadata") or {})})
            session["subscription"] = subscription["id"]
        session.update(status="complete", payment_status="paid")
        return session

    def _fingerprint(self, path: str, form: dict[str, str]) -> str:
        return hashlib.sha256(json.dumps([path, sorted(form.items())]).encode()).hexdigest()

    def _replayed(self, key: str | None, path: str,
                  form: dict[str, str]) -> web.Response | None:
        """Stripe's idempotency: the same key answers the first response again; the same key
        with other parameters is an error."""
        if key is None or key not in self._idempotent:
            return None
        fingerprint, status, body = self._idempotent[key]
        if fingerprint != self._fingerprint(path, form):
            return web.json_response({"error": {
                "type": "idempotency_error",
                "message": "Keys for idempotent requests can only be used with the same "
                           "parameters they were first used with."}}, status=400)
        return web.json_response(body, status=status)

    def _remember(self, key: str | None, path: str, form: dict[str, str], status: int,
                  body: Obj) -> web.Response:
        if key is not None:
            self._idempotent[key] = (self._fingerprint(path, form), status, body)
        if path in self.lose_response:
            return web.json_response({"error": {"type": "api_error",
                                                "message": "response lost"}}, status=500)
        return web.json_response(body, status=status)

    def _create_intent(self, form: dict[str, str]) -> tuple[int, Obj]:
        customer, method = form.get("customer"), form.get("payment_method")
        outcome = self.outcomes.get(method or "") or self.outcomes.get(customer or "",
                                                                        "succeeded")
        amount = int(form["amount"])
        intent: Obj = {
            "id": _new_id("pi"), "object": "payment_intent", "amount": amount,
            "amount_received": amount if outcome == "succeeded" else 0,
            "currency": form.get("currency", "usd"), "customer": customer,
            "payment_method": method, "created": int(time.time()), "invoice": None,
            "latest_charge": _new_id("ch") if outcome == "succeeded" else None,
            "metadata": form_params(form).get("metadata", {}),
            "status": {"succeeded": "succeeded", "requires_action": "requires_action"}.get(
                outcome, "requires_payment_method"),
        }
        self.intents.append(self.add(intent))
        if outcome == "declined":
            return 402, {"error": {
                "type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
                "message": "Your card was declined.", "payment_intent": intent}}
        return 200, intent

    def _create_customer(self, form: dict[str, str]) -> tuple[int, Obj]:
        params = form_params(form)
        return 200, self.add({
            "id": _new_id("cus"), "object": "customer", "created": int(time.time()),
            "email": params.get("email"), "name": params.get("name"), "livemode": False,
            "metadata": params.get("metadata", {}),
            "invoice_settings": {"default_payment_method": None}})

    def _create_session(self, form: dict[str, str]) -> tuple[int, Obj]:
        params = form_params(form)
        customer = params.get("customer")
        if customer is not None and customer not in self.objects:
            return 400, _no_such("customer", customer)
        lines = []
        for line in params.get("line_items", []):
            if line.get("price") not in self.prices:
                return 400, _no_such("price", str(line.get("price")))
            cents, currency = self.prices[line["price"]]
            quantity = int(line.get("quantity", 1))
            lines.append({**line_item(line["price"], quantity=quantity,
                                      amount_total=cents * quantity), "currency": currency})
        if not lines:
            return 400, {"error": {"type": "invalid_request_error",
                                   "message": "line_items is required"}}
        session_id = f"cs_test_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        session = self.add({
            "id": session_id, "object": "checkout.session", "mode": params.get("mode", "payment"),
            "customer": customer, "client_reference_id": params.get("client_reference_id"),
            "metadata": params.get("metadata", {}), "status": "open",
            "payment_status": "unpaid", "payment_intent": None, "subscription": None,
            "amount_total": sum(line["amount_total"] for line in lines),
            "currency": lines[0]["currency"], "created": now, "expires_at": now + SESSION_SECONDS,
            "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            "url": f"{self.url}/c/pay/{session_id}", "livemode": False})
        self.line_items[session_id] = lines
        self._session_data[session_id] = {key: params[key] for key in (
            "payment_intent_data", "subscription_data") if key in params}
        return 200, session

    def _create_portal_session(self, form: dict[str, str]) -> tuple[int, Obj]:
        params = form_params(form)
        customer = params.get("customer")
        if customer not in self.objects:
            return 400, _no_such("customer", str(customer))
        portal_id = _new_id("bps")
        return 200, {"id": portal_id, "object": "billing_portal.session", "customer": customer,
                     "return_url": params.get("return_url"), "created": int(time.time()),
                     "livemode": False, "url": f"{self.url}/p/session/{portal_id}"}

    async def _post(self, request: web.Request, parts: list[str]) -> web.Response | None:
        creates = {
            ("v1", "payment_intents"): self._create_intent,
            ("v1", "customers"): self._create_customer,
            ("v1", "checkout", "sessions"): self._create_session,
            ("v1", "billing_portal", "sessions"): self._create_portal_session,
        }
        create = creates.get(tuple(parts))
        if create is None:
            return None
        form = {k: str(v) for k, v in (await request.post()).items()}
        key = request.headers.get("Idempotency-Key")
        replayed = self._replayed(key, request.path, form)
        if replayed is not None:
            return replayed
        status, body = create(form)
        if status == 200:
            self.created.setdefault(str(body["object"]), []).append(body)
        return self._remember(key, request.path, form, status, body)

    @staticmethod
    def _list(url: str, data: list[Obj]) -> web.Response:
        return web.json_response({"object": "list", "url": url, "has_more": False, "data": data})

    @staticmethod
    def _missing(what: str) -> web.Response:
        return web.json_response(_no_such("resource", what), status=404)

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.calls[path] += 1
        failure = self.fail_paths.get(path, self.fail_with)
        if failure is not None:
            return web.json_response(
                {"error": {"type": "api_error", "message": "injected failure"}},
                status=failure)
        parts = path.strip("/").split("/")
        if parts[:2] == ["c", "pay"] and len(parts) == 3:
            return await self._pay_page(request, parts[2])
        if parts[:2] == ["p", "session"]:
            return web.Response(text=_page("Billing portal (test)", "<p>Payment methods, "
                                           "invoices and plan changes would be here.</p>"),
                                content_type="text/html")
        if request.method == "POST":
            created = await self._post(request, parts)
            if created is not None:
                return created
        return self._read(request, parts)

    def _read(self, request: web.Request, parts: list[str]) -> web.Response:
        path = request.path
        if parts == ["v1", "events"]:
            return self._events(request)
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
            of_invoice = request.query.get("invoice")
            return self._list(path, [o for o in self.objects.values()
                                     if o.get("object") == "invoice_payment"
                                     and o.get("invoice") == of_invoice])
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
        if len(parts) == 4 and parts[:3] == ["v1", "checkout", "sessions"] \
                and parts[3] in self.objects:
            return web.json_response(self.objects[parts[3]])
        if len(parts) == 3 and parts[0] == "v1" and parts[2] in self.objects:
            return web.json_response(self.objects[parts[2]])
        return self._missing(path)

    async def _pay_page(self, request: web.Request, session_id: str) -> web.Response:
        """The hosted Checkout page's stand-in: GET shows the session, POST pays it, delivers
        `checkout.session.completed` to the webhook (when set) and answers the paid session as
        JSON, or sends a browser on to the session's `success_url`."""
        session = self.objects.get(session_id)
        if session is None or session.get("object") != "checkout.session":
            return self._missing(session_id)
        if request.method == "GET":
            lines = "".join(f"<li>{html.escape(line['price']['id'])} x{line['quantity']}</li>"
                            for line in self.line_items.get(session_id, []))
            body = (f"<ul>{lines}</ul><p>Total {session['amount_total'] / 100:.2f} "
                    f"{html.escape(str(session['currency']).upper())}</p>"
                    f'<form method="post"><button type="submit">Pay (test)</button></form>')
            return web.Response(text=_page("Checkout (test)", body), content_type="text/html")
        paid = self.complete_checkout(session_id)
        delivered = await self._deliver_paid(paid) if self.webhook is not None else []
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response({"session": paid, "events": delivered})
        raise web.HTTPSeeOther(str(paid.get("success_url") or "/"))

    async def _deliver_paid(self, paid: Obj) -> list[Obj]:
        """What Stripe sends once a Checkout is paid: the session's completion, and the payment
        intent's success or the subscription's creation; each delivery's answer."""
        second = ("payment_intent.succeeded", self.objects[paid["payment_intent"]]) \
            if paid["mode"] == "payment" else \
            ("customer.subscription.created", self.objects[paid["subscription"]])
        delivered = []
        for event_type, obj in (("checkout.session.completed", paid), second):
            event, response = await self.deliver(event_type, obj)
            delivered.append({"id": event["id"], "type": event_type,
                              "status": response.status_code, "answer": response.text})
        return delivered

    def event(self, event_type: str, obj: Obj) -> Obj:
        """An event of `obj` as Stripe sends it, kept for `GET /v1/events`."""
        event = {"id": _new_id("evt"), "object": "event", "api_version": "2025-09-30.clover",
                 "created": int(time.time()), "livemode": False, "type": event_type,
                 "data": {"object": json.loads(json.dumps(obj))}}
        self.events.append(event)
        return event

    async def deliver(self, event_type: str, obj: Obj) -> tuple[Obj, httpx.Response]:
        """Send the signed event of `obj` to the webhook; the event and the answer."""
        assert self.webhook is not None
        event = self.event(event_type, obj)
        body = json.dumps(event)
        signature = stripe.WebhookSignature.generate_signature_header(body, self.webhook.secret)
        async with httpx.AsyncClient(timeout=30.0) as http:
            return event, await http.post(self.webhook.url, content=body, headers={
                "Content-Type": "application/json", "Stripe-Signature": signature})

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

    _KEPT = ("objects", "line_items", "refunds", "events", "intents", "created", "_session_data")

    async def start(self) -> None:
        if self.state_file is not None and self.state_file.exists():
            kept = json.loads(self.state_file.read_text(encoding="utf-8"))
            for name in self._KEPT:
                setattr(self, name, kept.get(name, getattr(self, name)))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.state_file is not None:
            kept = {name: getattr(self, name) for name in self._KEPT}
            self.state_file.write_text(json.dumps(kept), encoding="utf-8")


def _no_such(kind: str, what: str) -> Obj:
    return {"error": {"type": "invalid_request_error", "code": "resource_missing",
                      "message": f"No such {kind}: '{what}'"}}


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
            f"<body><h1>{title}</h1>{body}</body></html>")
