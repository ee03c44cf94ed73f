"""Playing a Stripe scenario (`tests/scenarios/*.yaml`, format in its README) against a running
engine: the objects served by the Stripe fake, the signed events, the barriers and the checks.

`tests/test_scenarios.py` plays every file in process; the chaos soak (`bench/soak.py`) plays
them against the engine's processes while it injects faults, through a subclass that retries
what a fault interrupts.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from stripe_fake import StripeFake, line_item
from stripe_payloads import deliver, event, resource
from temporalio.client import Client, WorkflowExecutionStatus

from billing.runtime import Runtime
from billing.store.ledger import Ledger

Obj = dict[str, Any]

HERE = Path(__file__).parent / "scenarios"
FILES = sorted(HERE.glob("*.yaml"))
SETTLE_S = 60.0


def load(path: Path) -> Obj:
    scenario: Obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    return scenario


# ---- building Stripe objects from a scenario ---------------------------------------------------


def substitute(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        if value[1:] not in ids:
            raise KeyError(f"{value} is not declared in `ids`")
        return ids[value[1:]]
    if isinstance(value, dict):
        return {k: substitute(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, ids) for v in value]
    return value


DEFAULTS: dict[str, Obj] = {
    "checkout.session": {"mode": "payment", "payment_status": "paid", "status": "complete",
                         "amount_total": 4900, "amount_subtotal": 4900, "currency": "usd",
                         "metadata": {}, "customer": None, "subscription": None,
                         "payment_intent": None, "invoice": None},
    "payment_intent": {"amount": 4900, "amount_received": 4900, "status": "succeeded",
                       "metadata": {}, "latest_charge": None, "customer": None,
                       "canceled_at": None},
    "charge": {"amount": 4900, "metadata": {}, "payment_intent": None, "customer": None,
               "refunded": False, "amount_refunded": 0, "invoice": None},
    "refund": {"status": "succeeded", "payment_intent": None, "metadata": {}},
    "dispute": {"status": "needs_response", "payment_intent": None, "amount": 4900},
    "subscription": {"status": "active", "metadata": {}},
    "invoice": {"status": "open", "subscription": None, "metadata": {}, "parent": None},
    "customer": {"metadata": {}},
}


@dataclass
class Built:
    kind: str
    obj: Obj
    line_items: list[Obj] | None = None


def build(spec: Obj, served: dict[str, Built]) -> Built:
    """A Stripe object from a spec: `{kind, id, ...}` or `{ref: id, ...}` (a served one)."""
    spec = dict(spec)
    if "ref" in spec:
        base = served[spec.pop("ref")]
        built = Built(base.kind, copy.deepcopy(base.obj), base.line_items)
    else:
        kind = spec.pop("kind")
        built = Built(kind, resource(kind, **DEFAULTS.get(kind, {})))
        if "refunds" not in spec and kind == "charge":
            built.obj.pop("refunds", None)
    obj = built.obj
    for key, value in spec.items():
        if built.kind == "subscription" and key in ("price", "quantity", "period_start"):
            item = obj["items"]["data"][0]
            if key == "price":
                item["price"]["id"] = value
            elif key == "quantity":
                item["quantity"] = value
            else:
                item["current_period_start"] = value
        elif built.kind == "subscription" and key == "items":
            first = obj["items"]["data"][0]
            obj["items"]["data"] = [
                {**copy.deepcopy(first), "id": f"si_{uuid.uuid4().hex[:14]}",
                 "price": {**first["price"], "id": i["price"]}, "quantity": i.get("quantity", 1)}
                for i in value]
        elif built.kind == "checkout.session" and key == "line_items":
            built.line_items = [line_item(i["price"], quantity=i.get("quantity", 1),
                                          amount_total=i.get("amount_total", 4900))
                                for i in value]
        elif built.kind == "invoice" and key == "lines":
            obj["lines"] = {"object": "list", "has_more": False,
                            "url": f"/v1/invoices/{obj['id']}/lines", "data": [
                                invoice_line(obj["id"], **line) for line in value]}
        elif built.kind == "invoice" and key == "lines_first_page_only":
            # The event carries only the first `value` lines; the fake serves them all.
            obj["lines"] = {**obj["lines"], "data": obj["lines"]["data"][:value],
                            "has_more": True}
        elif built.kind == "invoice" and key == "subscription":
            obj["parent"] = {"type": "subscription_details", "quote_details": None,
                             "subscription_details": {"subscription": value, "metadata": None}}
        elif built.kind == "charge" and key == "refunds":
            refunds = [build({"kind": "refund", **r}, served).obj for r in value]
            obj["refunds"] = {"object": "list", "data": refunds, "has_more": False,
                              "url": f"/v1/charges/{obj['id']}/refunds"}
        else:
            obj[key] = value
    return built


def invoice_line(invoice: str, *, price: str, quantity: int = 1, amount: int = 4900) -> Obj:
    """An invoice line item as API versions from 2025-03-31 shape it (`pricing.price_details`)."""
    return {"id": f"il_{uuid.uuid4().hex[:16]}", "object": "line_item", "invoice": invoice,
            "amount": amount, "currency": "usd", "quantity": quantity, "metadata": {},
            "pricing": {"type": "price_details", "unit_amount_decimal": None,
                        "price_details": {"price": price, "product": "prod_pack"}}}


# ---- one play --------------------------------------------------------------------------------


@dataclass
class Play:
    scenario: Obj
    api: httpx.AsyncClient
    client: Client
    fake: StripeFake
    runtime: Runtime
    label: str
    ids: dict[str, str] = field(default_factory=dict)
    served: dict[str, Built] = field(default_factory=dict)
    t0: int = field(default_factory=lambda: int(time.time()) - 3600)
    delivered: list[str] = field(default_factory=list)
    #: Events given an `id_rank` get ids `evt_<ids_base><rank>`, so their order is the ranks'.
    ids_base: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def __post_init__(self) -> None:
        self.ids = {sym: f"{prefix}_{uuid.uuid4().hex[:14]}"
                    for sym, prefix in (self.scenario.get("ids") or {}).items()}
        for spec in substitute(self.scenario.get("stripe") or [], self.ids):
            built = build(spec, self.served)
            self.served[built.obj["id"]] = built
            self.fake.add(built.obj)
            if built.line_items is not None:
                self.fake.line_items[built.obj["id"]] = built.line_items

    @property
    def org(self) -> str:
        return self.ids["org"]

    def where(self, index: int) -> str:
        return f"{self.scenario['name']} [{self.label}] step {index + 1}"

    def event_of(self, index: int, step: Obj) -> Obj:
        step = substitute(step, self.ids)
        built = build(step["object"], self.served)
        if built.line_items is not None:
            self.fake.line_items[built.obj["id"]] = built.line_items
        created = self.t0 + int(step.get("at", 10 * index))
        rank = step.get("id_rank")
        event_id = (f"evt_{self.ids_base}{int(rank):04d}" if rank is not None
                    else f"evt_{uuid.uuid4().hex[:20]}")
        return event(step["event"], built.obj, created=created, event_id=event_id)

    async def send(self, evt: Obj) -> None:
        response = await deliver(self.api, evt)
        assert response.status_code == 200, response.text
        self.delivered.append(evt["id"])

    async def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """An HTTP request to the engine's API (barriers and checks go through here)."""
        return await self.api.request(method, url, **kwargs)

    async def settle(self, event_id: str, *, deadline_s: float = SETTLE_S) -> str:
        """The run's outcome once it completed, `failed`, or `waiting` while it waits for a
        purchase (only when `deadline_s` allows waiting: the in-order play)."""
        handle = self.client.get_workflow_handle(f"stripe-{event_id}")
        give_up = time.monotonic() + deadline_s
        while True:
            status = (await handle.describe()).status
            if status == WorkflowExecutionStatus.COMPLETED:
                result = await handle.result()
                return str(result["outcome"] if isinstance(result, dict) else result.outcome)
            if status != WorkflowExecutionStatus.RUNNING:
                return "failed"
            if deadline_s < SETTLE_S and await handle.query("waiting_for"):
                return "waiting"
            if time.monotonic() > give_up:
                raise AssertionError(f"{event_id} still running after {deadline_s} s")
            await asyncio.sleep(0.1)

    async def barrier(self, index: int, step: Obj) -> None:
        """A non-event step; running it again changes nothing (the usage run id is the step's)."""
        if "usage" in step:
            response = await self.call("POST", "/v1/usage", json={
                "org_id": self.org, "run_id": f"run-step-{index}", "units": int(step["usage"])})
            assert response.status_code == 200, response.text
        elif "register" in step:
            assert (await self.call("PUT", f"/v1/orgs/{self.org}")).status_code in (200, 201)
        elif "checkout" in step:
            await self.checkout(index, step["checkout"], substitute(step.get("metadata"), self.ids))
        elif "expire" in step:
            when = datetime.fromtimestamp(self.t0, UTC) + timedelta(days=int(step["expire"]))
            ledger = Ledger(self.runtime.db)
            for lot in await ledger.lots(self.org):
                if lot.get("expires_at") is not None and lot["expires_at"] <= when:
                    await ledger.expire(self.org, lot["_id"], when)
        else:
            raise AssertionError(f"unknown step {step}")

    async def checkout(self, index: int, body: Obj, metadata: Obj | None) -> None:
        """A purchase the engine starts (`POST /v1/orgs/$org/checkout`, asked again with the same
        `Idempotency-Key` when a fault interrupted it), paid on Checkout: the session it made is
        served as `$cs`, the payment intent paying it as `$pi`, both with `metadata` instead of
        the engine's when given (an integration that replaced it)."""
        response = await self.call("POST", f"/v1/orgs/{self.org}/checkout", json=body,
                                   headers={"Idempotency-Key": f"{self.org}-step-{index}"})
        assert response.status_code == 200, response.text
        checkout_id = response.json()["checkout_id"]
        [session] = [s for s in self.fake.created.get("checkout.session", [])
                     if s["client_reference_id"] == checkout_id]
        paid = self.fake.complete_checkout(session["id"])
        intent = self.fake.objects[paid["payment_intent"]]
        for symbol, obj in (("cs", paid), ("pi", intent)):
            if metadata is not None:
                obj["metadata"] = dict(metadata)
            self.ids[symbol] = obj["id"]
            self.served[obj["id"]] = Built(obj["object"], obj)

    # ---- reading the state back ----------------------------------------------------------------

    async def check(self, expect: Obj, where: str, outcome: str | None = None) -> None:
        expect = substitute(expect, self.ids)
        if "outcome" in expect:
            assert outcome == expect["outcome"], f"{where}: outcome {outcome}"
        await self.check_org(self.org, expect, where)
        for other in expect.get("others", []):
            await self.check_org(other["org"], other, f"{where}, {other['org']}")
        if "failed" in expect:
            outcomes = [await self.settle(e) for e in dict.fromkeys(self.delivered)]
            assert outcomes.count("failed") == expect["failed"], f"{where}: {outcomes}"

    async def check_org(self, org: str, expect: Obj, where: str) -> None:
        """The state of one organization: `$org`, or another one the scenario names."""
        if {"balance", "lots"} & expect.keys():
            response = await self.call("GET", f"/v1/orgs/{org}/balance")
            body = response.json() if response.status_code == 200 else {"balance": 0, "lots": []}
            if "balance" in expect:
                assert body["balance"] == expect["balance"], f"{where}: balance {body}"
            if "lots" in expect:
                lots = [[lot["units"], lot["remaining"]] for lot in body["lots"]]
                assert lots == expect["lots"], f"{where}: lots {lots}"
        if {"plan", "status", "past_due"} & expect.keys():
            response = await self.call("GET", f"/v1/orgs/{org}/subscription")
            view = response.json() if response.status_code == 200 else {
                "plan_id": "free", "status": "none", "past_due_since": None}
            for key, field_name in (("plan", "plan_id"), ("status", "status")):
                if key in expect:
                    assert view[field_name] == expect[key], f"{where}: subscription {view}"
            if "past_due" in expect:
                assert (view["past_due_since"] is not None) == expect["past_due"], \
                    f"{where}: subscription {view}"
        if "quota" in expect:
            quota = (await self.call("GET", f"/v1/orgs/{org}/quota")).json()
            for key, value in expect["quota"].items():
                assert quota[key] == value, f"{where}: quota {quota}"
        if {"notifications", "notifications_include", "notifications_exclude",
                "notification_payloads"} & expect.keys():
            response = await self.call("GET", f"/v1/orgs/{org}/notifications")
            notes = response.json()["notifications"] if response.status_code == 200 else []
            found = Counter(n["type"] for n in notes)
            for kind, fields in (expect.get("notification_payloads") or {}).items():
                payloads = [n["payload"] for n in notes if n["type"] == kind]
                assert payloads, f"{where}: no {kind} in {found}"
                for payload in payloads:
                    assert {k: payload.get(k) for k in fields} == fields, \
                        f"{where}: {kind} payload {payload}"
            if "notifications" in expect:
                assert found == Counter(expect["notifications"]), f"{where}: {found}"
            for kind in expect.get("notifications_include", []):
                assert found[kind] > 0, f"{where}: no {kind} in {found}"
            for kind in expect.get("notifications_exclude", []):
                assert found[kind] == 0, f"{where}: {kind} in {found}"

    # ---- the plays -------------------------------------------------------------------------------

    async def in_order(self) -> None:
        for index, step in enumerate(self.scenario["steps"]):
            if "event" in step:
                evt = self.event_of(index, step)
                await self.send(evt)
                outcome = await self.settle(evt["id"], deadline_s=SETTLE_S / 2)
            else:
                await self.barrier(index, step)
                outcome = None
            await self.check(step.get("expect") or {}, self.where(index), outcome)
        await self.finish()

    async def shuffled(self, seed: int) -> None:
        await self.deliver_shuffled(seed)
        await self.finish()

    async def deliver_shuffled(self, seed: int) -> None:
        """Every event twice, in an order drawn from `seed`, within each stretch between two
        barriers; each stretch settled before its barrier runs."""
        shuffle = random.Random(seed)
        segment: list[Obj] = []

        async def flush() -> None:
            deliveries = segment + segment
            shuffle.shuffle(deliveries)
            for evt in deliveries:
                await self.send(evt)
            for evt in segment:
                await self.settle(evt["id"])
            segment.clear()

        for index, step in enumerate(self.scenario["steps"]):
            if "event" in step:
                segment.append(self.event_of(index, step))
            else:
                await flush()
                await self.barrier(index, step)
        await flush()

    async def finish(self) -> None:
        for event_id in dict.fromkeys(self.delivered):
            await self.settle(event_id)
        await self.check(self.scenario.get("final") or {}, f"{self.scenario['name']} "
                         f"[{self.label}] final")
