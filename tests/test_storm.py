"""Redelivery storm: 500 distinct Stripe events across 10 organizations, each delivered three
times, shuffled, 32 at a time, through the signed webhook into the real worker.

Stripe promises neither order nor single delivery, so a refund or a dispute may arrive before
its purchase (it then waits for the credit), an older subscription update after a newer one
(`stale`), and a dispute's reinstatement before its withdrawal (which it voids: the withdrawal is
then a `duplicate`). What must hold whatever the order: one workflow per event, none failed, the
ledger holds exactly what the recorded outcomes say they wrote, each key once, every purchase
credited once, the plan of the newest subscription update, and the ledger invariants.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from faults import (
    WorkerProcess,
    app_client,
    delete_schedules_of,
    failures,
    outcomes,
    runtime_on,
    wait_until,
    worker_env,
)
from ledger_checks import assert_consistent
from stripe_fake import StripeFake
from stripe_payloads import (
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
    subscription,
)
from temporalio.client import Client

from billing.runtime import Runtime
from billing.store.database import Database

Obj = dict[str, Any]

ORGS = 10
DELIVERIES = 3
CONCURRENCY = 32
PACK = "pack_500k"
PACK_UNITS = 500000
PURCHASE_TYPES = {"payment_intent.succeeded", "checkout.session.completed"}
#: The outcomes each kind of event may have, depending on what arrived before it.
ALLOWED = {
    "payment_intent.succeeded": {"applied", "duplicate"},
    "checkout.session.completed": {"applied", "duplicate"},
    "refund.created": {"applied"},
    "charge.refunded": {"applied"},
    "charge.dispute.created": {"applied"},
    "charge.dispute.funds_withdrawn": {"applied", "duplicate"},
    "charge.dispute.funds_reinstated": {"applied"},
    "customer.subscription.created": {"applied", "stale"},
    "customer.subscription.updated": {"applied", "stale"},
    "invoice.payment_failed": {"applied", "stale"},
    "invoice.paid": {"applied", "stale"},
}


@dataclass
class OrgStorm:
    """One organization's 50 events and what they must leave behind."""

    org: str
    events: list[Obj] = field(default_factory=list)
    payment_intents: list[str] = field(default_factory=list)
    plan: str = "pro"


def org_storm(org: str, fake: StripeFake, t0: int) -> OrgStorm:
    storm = OrgStorm(org)
    meta = metadata(org, PACK)
    add = storm.events.append
    bought = [(new_id("pi"), new_id("ch")) for _ in range(12)]
    checkout_only = [new_id("pi") for _ in range(4)]
    storm.payment_intents = [pi for pi, _ in bought] + checkout_only
    for pi, ch in bought:  # 12 purchases without Checkout, as Stripe holds them
        intent = fake.add(payment_intent(pi=pi, meta=meta, charge=ch))
        add(event("payment_intent.succeeded", intent))
    for pi in [pi for pi, _ in bought[:4]] + checkout_only:  # 4 seen twice, 4 through Checkout only
        add(event("checkout.session.completed",
                  fake.checkout(checkout_session(payment_intent=pi, meta=meta))))
    for pi, ch in bought[4:7]:  # 3 full refunds
        add(event("refund.created", refund(charge=ch, pi=pi, amount=4900)))
    for pi, ch in (bought[7], bought[7], bought[8]):  # half refunds: one lot twice, one once
        add(event("refund.created", refund(charge=ch, pi=pi, amount=2450)))
    for pi, ch in bought[9:12]:  # 3 refunded charges, their refunds in the payload
        refunds = [refund(charge=ch, pi=pi, amount=4900)]
        add(event("charge.refunded", charge(ch=ch, pi=pi, meta=metadata(org), refunds=refunds)))
    for i, pi in enumerate(checkout_only[:3]):  # 3 disputes, 2 of them won back
        dp, ch = new_id("dp"), new_id("ch")
        add(event("charge.dispute.created",
                  dispute(dp=dp, ch=ch, pi=pi, amount=4900, status="needs_response")))
        add(event("charge.dispute.funds_withdrawn",
                  dispute(dp=dp, ch=ch, pi=pi, amount=4900, status="needs_response")))
        if i < 2:
            add(event("charge.dispute.funds_reinstated",
                      dispute(dp=dp, ch=ch, pi=pi, amount=4900, status="won")))
    cus, sub = new_id("cus"), new_id("sub")
    prices = ["price_starter_monthly", "price_pro_monthly"]
    for k in range(6):  # the newest (k = 5) is on pro; the older ones alternate
        kind = "customer.subscription.created" if k == 0 else "customer.subscription.updated"
        add(event(kind, subscription(sub=sub, customer=cus, price=prices[k % 2],
                                     meta=metadata(org)), created=t0 + k))
    fake.add(subscription(sub=sub, customer=cus, price="price_pro_monthly", meta=metadata(org)))
    for k in range(7):  # a paid invoice reads the subscription back from Stripe
        kind = "invoice.payment_failed" if k % 2 == 0 else "invoice.paid"
        add(event(kind, invoice(customer=cus, sub=sub, meta=metadata(org)), created=t0 + 10 + k))
    assert len(storm.events) == 50
    return storm


def ledger_lines(written: list[str]) -> list[tuple[str, int]]:
    """`ledger <key> <+amount>` lines of an outcome's `written`."""
    lines = []
    for line in written:
        if line.startswith("ledger "):
            key, amount = line.removeprefix("ledger ").rsplit(" ", 1)
            lines.append((key, int(amount)))
    return lines


async def test_a_redelivery_storm_applies_every_event_exactly_once(
    runtime: Runtime, stripe_fake: StripeFake, temporal_client: Client, db: Database,
    tmp_path: Path,
) -> None:
    t0 = int(time.time()) - 3600
    storms = [org_storm(f"org-storm-{new_id('o')[2:14]}-{i}", stripe_fake, t0)
              for i in range(ORGS)]
    events = [e for s in storms for e in s.events]
    ids = [e["id"] for e in events]
    assert len(set(ids)) == 50 * ORGS
    deliveries = [e for e in events for _ in range(DELIVERIES)]
    random.Random(20260506).shuffle(deliveries)

    # The worker runs in a process of its own, as deployed: the webhook and this test keep theirs.
    engine = runtime_on(runtime, temporal_task_queue=f"billing-storm-{new_id('q')[2:10]}")
    worker = WorkerProcess(worker_env(engine.settings, temporal_client,
                                      stripe_api_base=stripe_fake.url), tmp_path / "worker.log")
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(api: httpx.AsyncClient, evt: Obj) -> tuple[str, int, str]:
        async with gate:
            response = await deliver(api, evt)
        return evt["id"], response.status_code, response.json().get("status", "")

    async def closed() -> bool:
        """Every event recorded (in the transaction of its change) or its workflow failed."""
        recorded = await db.stripe_events.count_documents({"_id": {"$in": ids}})
        failed = await temporal_client.count_workflows(
            f'TaskQueue="{engine.settings.temporal_task_queue}" AND ExecutionStatus="Failed"')
        return recorded + failed.count == len(ids)

    try:
        await worker.start()
        started = time.monotonic()
        async with app_client(engine, temporal_client) as api:
            acks = await asyncio.gather(*(send(api, e) for e in deliveries))
        delivered = time.monotonic() - started
        await wait_until(closed, "every workflow to close", timeout_s=600, every_s=0.5)
        elapsed = time.monotonic() - started
        failed = await failures(temporal_client, ids)
        results = await outcomes(temporal_client, [e for e in ids if e not in failed])
    finally:
        await worker.stop()
        await delete_schedules_of(temporal_client, engine.settings.temporal_task_queue)
        await engine.db.close()
    print(f"storm: {len(deliveries)} deliveries in {delivered:.1f} s, "
          f"{len(ids)} events applied in {elapsed:.1f} s")

    # The webhook: every delivery answered 200, one start per event, the redeliveries duplicates.
    per_event: dict[str, Counter[str]] = defaultdict(Counter)
    for event_id, status, ack in acks:
        assert status == 200, (event_id, status, ack)
        per_event[event_id][ack] += 1
    assert {eid: dict(c) for eid, c in per_event.items()} == {
        eid: {"started": 1, "duplicate": DELIVERIES - 1} for eid in ids}

    by_type = {e["id"]: e["type"] for e in events}
    assert failed == {}  # whatever came first, everything applied

    # Each workflow's outcome is one its event may have, and the record agrees with it.
    kinds = Counter((by_type[eid], r.outcome) for eid, r in results.items())
    print(sorted(kinds.items()))
    for (kind, outcome), _ in kinds.items():
        assert outcome in ALLOWED[kind], (kind, outcome)
    records = {d["_id"]: d async for d in db.stripe_events.find({"_id": {"$in": ids}})}
    assert {eid: d["outcome"] for eid, d in records.items()} == {
        eid: r.outcome for eid, r in results.items()}

    orgs = [s.org for s in storms]
    entries = [e async for e in db.ledger.find({"org_id": {"$in": orgs}})]
    # The ledger holds exactly what the outcomes say they wrote: nothing lost, nothing twice.
    claimed = Counter((r.org_id, key, amount) for r in results.values()
                      for key, amount in ledger_lines(r.written))
    stored = Counter((e["org_id"], e["key"], e["amount"]) for e in entries)
    assert stored == claimed
    assert max(Counter((e["org_id"], e["key"]) for e in entries).values()) == 1

    accounts = {a["_id"]: a async for a in db.accounts.find({"_id": {"$in": orgs}})}
    for storm in storms:
        # Every purchase credited once, whichever of its events came first.
        purchases = Counter(r.outcome for eid, r in results.items()
                            if r.org_id == storm.org and by_type[eid] in PURCHASE_TYPES)
        assert purchases == {"applied": 16, "duplicate": 4}, (storm.org, purchases)
        credited = {key for (org, key, amount) in stored
                    if org == storm.org and amount == PACK_UNITS and key.startswith("payment:")}
        assert credited == {f"payment:{pi}" for pi in storm.payment_intents}
        assert accounts[storm.org]["plan_id"] == storm.plan
        await assert_consistent(db, storm.org)
