"""The chaos soak's workload and its model of what should have happened.

Two kinds of organization, each driven by its own task from the seed:

- **Scenario organizations** play a Stripe flow of `tests/scenarios/*.yaml` (carts with
  quantities, refunds partial, failed and reversed, disputes withdrawn and reinstated,
  subscription lifecycles): every event delivered twice, shuffled, to either API. The model is
  the scenario's `final`, written by hand from Stripe's documentation.
- **Usage organizations** are registered (the free plan's signup grant), some linked to a Stripe
  customer by a `starter` subscription with automatic top-up on, then send usage records one by
  one and in batches, buy packs (a Checkout session and its payment intent, each delivered one
  to three times in any order) and receive admin credits. The model counts what was
  acknowledged: `balance = grant + packs + credits + top-ups - max(0, used - quota)`, the
  top-ups being the payment intents the Stripe fake created for the customer.

Every client retries on a connection error, a timeout or a 5xx until it gets an answer, as Stripe
and a careful app do; a record or a purchase counts in the model once it was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pymongo.errors import PyMongoError
from scenario_play import FILES, Play, load
from stripe_fake import StripeFake, line_item
from stripe_payloads import checkout_session, deliver, event, new_id, payment_intent, subscription
from temporalio.client import Client
from temporalio.service import RPCError

from billing.models import AdminRequest
from starter.operations.adjustments import start_adjustment

Obj = dict[str, Any]
T = TypeVar("T")

GRANT = 500
STARTER_QUOTA = 50000
PACK = "pack_50k"
PACK_UNITS = 50000
PACK_CENTS = 900
TOPUP_BELOW = 30000
TOPUP_MAX_PER_MONTH = 2
#: Scenarios whose flow the soak does not replay: none yet; a file is listed here with why.
SKIPPED_SCENARIOS: dict[str, str] = {}


class Gone(Exception):
    """A request could not be answered before the run's deadline."""


@dataclass
class Api:
    """Both APIs as a client sees them: each call goes to one at random and is retried, on
    either, until it is answered below 500."""

    clients: list[httpx.AsyncClient]
    rng: random.Random
    deadline: float
    retries: int = 0

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._answered(lambda api: api.request(method, path, **kwargs),
                                    f"{method} {path}")

    async def deliver(self, evt: Obj) -> None:
        """A signed Stripe event (signed again at every attempt), delivered until answered 200,
        as Stripe retries."""
        response = await self._answered(lambda api: deliver(api, evt), evt["id"])
        if response.status_code != 200:
            raise AssertionError(f"{evt['id']}: {response.status_code} {response.text}")

    async def _answered(self, send: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
                        what: str) -> httpx.Response:
        while True:
            try:
                response = await send(self.rng.choice(self.clients))
                if response.status_code < 500:
                    return response
            except httpx.HTTPError:
                pass
            self.retries += 1
            if asyncio.get_running_loop().time() > self.deadline:
                raise Gone(f"{what} got no answer before the deadline")
            await asyncio.sleep(0.2)


async def until_done(what: Callable[[], Awaitable[T]], deadline: float,
                     errors: tuple[type[BaseException], ...]) -> T:
    """`what()` again after any of `errors` (a server that is down) until the deadline."""
    while True:
        try:
            return await what()
        except errors:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


# ---- scenario organizations -------------------------------------------------------------------


@dataclass
class ScenarioPlay(Play):
    """A scenario played shuffled and duplicated through `Api`; settling and barriers ride out a
    Temporal or MongoDB that is down."""

    soak_api: Api | None = None

    async def send(self, evt: Obj) -> None:
        assert self.soak_api is not None
        await self.soak_api.deliver(evt)
        self.delivered.append(evt["id"])

    async def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        assert self.soak_api is not None
        return await self.soak_api.request(method, url, **kwargs)

    def event_of(self, index: int, step: Obj) -> Obj:
        evt = super().event_of(index, step)
        self.fake.events.append(evt)  # what Stripe lists to the reconciliation
        return evt

    async def settle(self, event_id: str, *, deadline_s: float = 600.0) -> str:
        assert self.soak_api is not None
        return await until_done(lambda: super(ScenarioPlay, self).settle(
            event_id, deadline_s=deadline_s), self.soak_api.deadline, (RPCError,))

    async def barrier(self, index: int, step: Obj) -> None:
        assert self.soak_api is not None
        await until_done(lambda: super(ScenarioPlay, self).barrier(index, step),
                         self.soak_api.deadline, (PyMongoError,))


class ScenarioDeck:
    """The scenario files in an order drawn from the seed, every file once before any twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.files = [f for f in FILES if f.stem not in SKIPPED_SCENARIOS]
        self.left: list[Path] = []
        self.dealt = 0

    def play(self, **common: Any) -> ScenarioPlay:
        if not self.left:
            self.left = list(self.files)
            self.rng.shuffle(self.left)
        self.dealt += 1
        return ScenarioPlay(load(self.left.pop()), label=f"soak {self.dealt}", **common)


# ---- usage organizations ----------------------------------------------------------------------


@dataclass
class UsageOrg:
    """One organization's scripted life and the model of what it should end with."""

    org: str
    rng: random.Random
    linked: bool
    actions: int
    customer: str | None = None
    used: int = 0
    records: int = 0
    batches: int = 0
    packs: int = 0
    credits: int = 0
    credited: int = 0
    events: int = 0
    deliveries: int = 0
    #: Purchases the engine started (`POST .../checkout`), and holds granted, released, refused.
    checkouts: int = 0
    holds: int = 0
    released: int = 0
    refused: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def quota(self) -> int:
        return STARTER_QUOTA if self.linked else 0

    def expected_balance(self, topups: int) -> int:
        return (GRANT + self.packs * PACK_UNITS + self.credited + topups * PACK_UNITS
                - max(0, self.used - self.quota))

    async def run(self, api: Api, fake: StripeFake, temporal: Client, stop: asyncio.Event,
                  task_queue: str) -> None:
        """Register (and link), then act until `stop` is set (at most `actions` times)."""
        response = await api.request("PUT", f"/v1/orgs/{self.org}")
        assert response.status_code in (200, 201), response.text
        if self.linked:
            await self._link(api, fake)
        for step in range(self.actions):
            if stop.is_set():
                return
            # An organization with automatic top-up buys no packs by hand: its overflow takes it
            # below the threshold, the top-ups refill it, the monthly limit ends them.
            action = self.rng.choices(
                ("usage", "held", "batch", "purchase", "checkout", "credit"),
                weights=(8, 3, 3, 0 if self.linked else 1, 0 if self.linked else 1, 1))[0]
            if action == "usage":
                await self._usage(api, step)
            elif action == "held":
                await self._held_run(api, step)
            elif action == "batch":
                await self._batch(api, step)
            elif action == "purchase":
                await self._purchase(api, fake)
            elif action == "checkout":
                await self._checkout(api, fake, step)
            else:
                await self._credit(api, temporal, task_queue, step)
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))

    async def _link(self, api: Api, fake: StripeFake) -> None:
        """A `starter` subscription names the organization and links its Stripe customer; then
        automatic top-up, which needs that link (409 until the event is applied)."""
        self.customer = new_id("cus")
        fake.customer(self.customer)
        sub = subscription(sub=new_id("sub"), customer=self.customer,
                           price="price_starter_monthly", meta={"org_id": self.org})
        fake.add(sub)
        await self._send(api, fake, [event("customer.subscription.created", sub)])
        settings = {"enabled": True, "pack_id": PACK, "below_units": TOPUP_BELOW,
                    "max_per_month": TOPUP_MAX_PER_MONTH}
        while True:
            response = await api.request("PUT", f"/v1/orgs/{self.org}/auto-topup", json=settings)
            if response.status_code == 200:
                return
            assert response.status_code == 409, response.text
            if asyncio.get_running_loop().time() > api.deadline:
                raise Gone(f"{self.org}: its subscription never linked its customer")
            await asyncio.sleep(0.5)

    async def _usage(self, api: Api, step: int) -> None:
        units = self.rng.randint(200, 4000)
        response = await api.request("POST", "/v1/usage", json={
            "org_id": self.org, "run_id": f"run-{step}", "units": units})
        if response.status_code != 200:
            self.problems.append(f"usage run-{step}: {response.status_code} {response.text}")
            return
        self.used += units
        self.records += 1

    async def _held_run(self, api: Api, step: int) -> None:
        """A run reserved first: refused when the organization cannot cover it (the run does
        not start), else its usage settles the hold, or the run fails and the hold is
        released."""
        units = self.rng.randint(200, 4000)
        hold_id = f"held-{step}"
        response = await api.request("POST", f"/v1/orgs/{self.org}/holds",
                                     json={"hold_id": hold_id, "units": units})
        if response.status_code == 409:
            self.refused += 1
            return
        if response.status_code != 201:
            self.problems.append(f"hold {hold_id}: {response.status_code} {response.text}")
            return
        self.holds += 1
        if self.rng.random() < 0.2:
            released = await api.request("DELETE", f"/v1/orgs/{self.org}/holds/{hold_id}")
            if released.status_code != 200:
                self.problems.append(f"release {hold_id}: {released.status_code}")
            self.released += 1
            return
        ran = self.rng.randint(units // 2, units * 2)
        response = await api.request("POST", "/v1/usage", json={
            "org_id": self.org, "run_id": f"run-{step}", "units": ran, "hold_id": hold_id})
        if response.status_code != 200:
            self.problems.append(f"usage run-{step}: {response.status_code} {response.text}")
            return
        self.used += ran
        self.records += 1

    async def _batch(self, api: Api, step: int) -> None:
        records = [{"org_id": self.org, "run_id": f"batch-{step}", "step": f"s{i}",
                    "units": self.rng.randint(50, 600)} for i in range(self.rng.randint(5, 20))]
        response = await api.request("POST", "/v1/usage/batch", json={"records": records})
        if response.status_code != 200:
            self.problems.append(f"batch-{step}: {response.status_code} {response.text}")
            return
        for record, result in zip(records, response.json()["results"], strict=True):
            if "error" in result:
                self.problems.append(f"batch-{step} {record['step']}: {result['error']}")
            else:
                self.used += record["units"]
                self.records += 1
        self.batches += 1

    async def _purchase(self, api: Api, fake: StripeFake) -> None:
        """A Checkout of `quantity` packs: the session and its payment intent, each delivered one
        to three times, in any order."""
        quantity = self.rng.randint(1, 3)
        meta = {"org_id": self.org, "pack_id": PACK}
        pi = new_id("pi")
        intent = payment_intent(pi=pi, meta=meta, amount=PACK_CENTS * quantity,
                                charge=new_id("ch"))
        session = checkout_session(payment_intent=pi, meta=meta, amount=PACK_CENTS * quantity)
        fake.add(intent)
        fake.checkout(session, [line_item(f"price_{PACK}", quantity=quantity,
                                          amount_total=PACK_CENTS * quantity)])
        await self._send(api, fake, [event("checkout.session.completed", session),
                                     event("payment_intent.succeeded", intent)])
        self.packs += quantity

    async def _checkout(self, api: Api, fake: StripeFake, step: int) -> None:
        """A purchase the engine starts: the Checkout asked for under an `Idempotency-Key`
        (asked again, on either API, until answered: one customer and one session whatever
        dies meanwhile), paid, and its events delivered with the engine's metadata stripped (the
        checkout record decides)."""
        quantity = self.rng.randint(1, 3)
        response = await api.request("POST", f"/v1/orgs/{self.org}/checkout",
                                     json={"pack_id": PACK, "quantity": quantity},
                                     headers={"Idempotency-Key": f"soak-{step}"})
        if response.status_code != 200:
            self.problems.append(f"checkout {step}: {response.status_code} {response.text}")
            return
        self.checkouts += 1
        [session] = [s for s in fake.created.get("checkout.session", [])
                     if s["url"] == response.json()["url"]]
        paid = fake.complete_checkout(session["id"])
        intent = fake.objects[paid["payment_intent"]]
        await self._send(api, fake, [event("checkout.session.completed", {**paid, "metadata": {}}),
                                     event("payment_intent.succeeded", {**intent, "metadata": {}})])
        self.packs += quantity

    async def _credit(self, api: Api, temporal: Client, task_queue: str, step: int) -> None:
        """An admin credit (`billing credit`'s workflow), asked again until Temporal took it."""
        units = self.rng.randint(100, 5000)
        request = AdminRequest(request_id=f"soak-{self.org}-{step}", org_id=self.org,
                               units=units, reason="soak credit", requested_by="soak")
        await until_done(lambda: start_adjustment(temporal, request, task_queue),
                         api.deadline, (RPCError,))
        self.credits += 1
        self.credited += units

    async def _send(self, api: Api, fake: StripeFake, events: list[Obj]) -> None:
        deliveries = [evt for evt in events for _ in range(self.rng.randint(1, 3))]
        self.rng.shuffle(deliveries)
        fake.events.extend(events)
        self.events += len(events)
        self.deliveries += len(deliveries)
        await asyncio.gather(*(api.deliver(evt) for evt in deliveries))


def usage_orgs(rng: random.Random, count: int, actions: int) -> list[UsageOrg]:
    return [UsageOrg(org=f"soak-{rng.getrandbits(40):010x}", rng=random.Random(rng.random()),
                     linked=i % 2 == 0, actions=actions) for i in range(count)]


@contextlib.asynccontextmanager
async def clients(urls: list[str], token: str) -> Any:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(
            base_url=url, timeout=5.0, headers={"Authorization": f"Bearer {token}"}))
            for url in urls]
