"""Cost must not grow with data: every query of the hot paths (registration, usage within quota
and overflowing, a subscription, a purchase and a refund through the signed webhook, balance
holds) is an index lookup, and none is a `findAndModify`, which the embedded server runs as a
collection scan.

The commands are taken from a PyMongo command listener on the engine's own client, so a new query
shape on these paths fails here until an index backs it.
"""

from __future__ import annotations

import uuid
from typing import Any

from faults import app_client, runtime_on
from pymongo import monitoring
from stripe_fake import StripeFake
from stripe_payloads import (
    deliver,
    dispute,
    event,
    metadata,
    payment_intent,
    refund,
    subscription,
)
from temporalio.client import Client

from billing.runtime import Runtime
from billing.store.database import INDEXES
from starter.outbox import dispatch_pending
from starter.topup_dispatch import TopUpStarter
from worker import build_worker

Obj = dict[str, Any]

#: For each collection, the fields that lead one of its indexes.
LEADING = {name: {"_id", *(next(iter(index.document["key"])) for index in indexes)}
           for name, indexes in INDEXES.items()}


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Obj]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        name = event.command_name
        collection = command.get(name)
        if not isinstance(collection, str):
            return
        filters: list[Obj] = []
        if name == "find":
            filters = [command.get("filter") or {}]
        elif name == "update":
            filters = [u["q"] for u in command.get("updates", [])]
        elif name == "delete":
            filters = [d["q"] for d in command.get("deletes", [])]
        elif name == "findAndModify":
            filters = [command.get("query") or {}]
        elif name == "aggregate":
            first = (command.get("pipeline") or [{}])[0]
            filters = [first.get("$match", {})]
        for found in filters:
            self.seen.append((name, collection, found))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def index_backed(collection: str, query: Obj) -> bool:
    """Some field of the filter leads an index (each branch of an `$or` on its own)."""
    if "$or" in query:
        return all(index_backed(collection, branch) for branch in query["$or"])
    return bool(LEADING.get(collection, {"_id"}) & set(query))


async def test_hot_paths_use_index_lookups_and_no_find_and_modify(
    runtime: Runtime, stripe_fake: StripeFake, temporal_client: Client
) -> None:
    commands = Commands()
    engine = runtime_on(runtime, temporal_task_queue=f"billing-shapes-{uuid.uuid4().hex[:8]}",
                        client_options={"event_listeners": [commands]})
    org, cus = f"org-shapes-{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:12]}"
    pi, ch = f"pi_{uuid.uuid4().hex[:12]}", f"ch_{uuid.uuid4().hex[:12]}"
    try:
        async with build_worker(temporal_client, engine), \
                app_client(engine, temporal_client) as api:
            assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
            overflow = await api.post("/v1/usage", json={"org_id": org, "run_id": "r1",
                                                         "units": 700})
            assert overflow.json()["overflow"] == 700
            sub = subscription(sub=f"sub_{uuid.uuid4().hex[:12]}", customer=cus,
                               price="price_pro_monthly", meta=metadata(org))
            for evt in (event("customer.subscription.created", sub),
                        event("payment_intent.succeeded", stripe_fake.add(
                            payment_intent(pi=pi, meta=metadata(org, "pack_500k"), charge=ch))),
                        event("refund.created", refund(charge=ch, pi=pi, amount=100))):
                assert (await deliver(api, evt)).status_code == 200
                handle = temporal_client.get_workflow_handle(f"stripe-{evt['id']}")
                await handle.result()
            within = await api.post("/v1/usage", json={"org_id": org, "run_id": "r2",
                                                       "units": 50})
            assert (within.json()["overflow"], within.json()["quota"]) == (0, 500000)
            # balance holds: grant, replay, refusal, the gate and meter, the list, a settling
            # record (alone and in a batch), a release
            for hold_id, units, status in (("h1", 10, 201), ("h1", 10, 201),
                                           ("h2", 10**9, 409), ("h3", 5, 201), ("h4", 5, 201)):
                held = await api.post(f"/v1/orgs/{org}/holds",
                                      json={"hold_id": hold_id, "units": units})
                assert held.status_code == status, held.text
            assert (await api.get(f"/v1/orgs/{org}/quota")).json()["held"] == 20
            assert (await api.get(f"/v1/orgs/{org}/meter")).json()["held"] == 20
            assert len((await api.get(f"/v1/orgs/{org}/holds")).json()["holds"]) == 3
            settled = await api.post("/v1/usage", json={"org_id": org, "run_id": "h1",
                                                        "units": 10, "hold_id": "h1"})
            assert settled.json()["applied"]
            batch = await api.post("/v1/usage/batch", json={"records": [
                {"org_id": org, "run_id": "h3", "units": 5, "hold_id": "h3"}]})
            assert batch.json()["results"][0]["applied"]
            assert (await api.delete(f"/v1/orgs/{org}/holds/h4")).json()["released"]
    finally:
        await engine.db.close()

    assert commands.seen, "the listener saw no command"
    collections = {collection for _, collection, _ in commands.seen}
    assert "holds" in collections and "hold_locks" not in collections
    assert not [c for c in commands.seen if c[0] == "findAndModify"]
    unindexed = [(name, collection, query) for name, collection, query in commands.seen
                 if not index_backed(collection, query)]
    assert unindexed == []


async def test_auto_top_up_uses_index_lookups_and_no_find_and_modify(
    runtime: Runtime, stripe_fake: StripeFake, temporal_client: Client
) -> None:
    """Settings, the usage record that triggers, the dispatcher's round, the workflow's charge
    and record, and a dispute on the top-up payment."""
    commands = Commands()
    engine = runtime_on(runtime, temporal_task_queue=f"billing-shapes-{uuid.uuid4().hex[:8]}",
                        client_options={"event_listeners": [commands]})
    org, cus = f"org-shapes-{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:12]}"
    stripe_fake.customer(cus)
    try:
        async with build_worker(temporal_client, engine), \
                app_client(engine, temporal_client) as api:
            assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
            sub = subscription(sub=f"sub_{uuid.uuid4().hex[:12]}", customer=cus,
                               price="price_starter_monthly", meta=metadata(org))
            linked = event("customer.subscription.created", sub)
            assert (await deliver(api, linked)).status_code == 200
            await temporal_client.get_workflow_handle(f"stripe-{linked['id']}").result()
            assert (await api.put(f"/v1/orgs/{org}/auto-topup", json={
                "enabled": True, "pack_id": "pack_500k", "below_units": 1000,
                "max_per_month": 3})).status_code == 200
            for run in ("r1", "r2", "r3", "r4", "r5", "r6"):  # the quota, then an overflow
                used = await api.post("/v1/usage", json={"org_id": org, "run_id": run,
                                                         "units": 10_000})
                assert used.status_code == 200
            assert (await api.get(f"/v1/orgs/{org}/auto-topup")).json()["this_month"] == 1
            assert await dispatch_pending(engine.db["auto_topups"],
                                          TopUpStarter(temporal_client, engine)) == 1
            await temporal_client.get_workflow_handle(f"auto-topup-{org}-1").result()
            intent = stripe_fake.intents_of(cus)[0]
            withdrawn = event("charge.dispute.funds_withdrawn", dispute(
                dp=f"dp_{uuid.uuid4().hex[:12]}", ch=intent["latest_charge"], pi=intent["id"],
                amount=4900, status="needs_response"))
            assert (await deliver(api, withdrawn)).status_code == 200
            await temporal_client.get_workflow_handle(f"stripe-{withdrawn['id']}").result()
    finally:
        await engine.db.close()

    assert any(collection == "auto_topups" for _, collection, _ in commands.seen)
    assert not [c for c in commands.seen if c[0] == "findAndModify"]
    unindexed = [(name, collection, query) for name, collection, query in commands.seen
                 if not index_backed(collection, query)]
    assert unindexed == []


async def test_outbound_webhooks_use_index_lookups_and_no_find_and_modify(
    runtime: Runtime, temporal_client: Client
) -> None:
    """The notification outbox: notify, the dispatcher's poll and clear, the delivery's
    acknowledgement and the oldest-undelivered gauge (on a database of its own: the dispatcher
    takes every pending notification it finds)."""
    from datetime import UTC, datetime

    from webhook_receiver import SECRET, Receiver

    from billing.store.accounts import Accounts
    from billing.store.books import notify
    from billing.webhooks import delivery_workflow_id
    from starter.webhook_dispatch import WebhookStarter, refresh_oldest_undelivered

    commands = Commands()
    receiver = Receiver()
    await receiver.start()
    engine = runtime_on(runtime, temporal_task_queue=f"billing-shapes-{uuid.uuid4().hex[:8]}",
                        mongodb_db=f"billing_shapes_{uuid.uuid4().hex[:8]}",
                        billing_webhook_url=receiver.url, billing_webhook_secret=SECRET,
                        client_options={"event_listeners": [commands]})
    org = f"org-shapes-{uuid.uuid4().hex[:8]}"
    try:
        await engine.db.ensure_indexes()
        await Accounts(engine.db, engine.config).register(org, datetime.now(UTC))
        async with build_worker(temporal_client, engine):
            for i in range(3):
                await notify(engine.db, None, org_id=org, type="payment.failed",
                             key=f"payment.failed:{i}", payload={}, now=datetime.now(UTC))
            assert await dispatch_pending(engine.db.notifications,
                                          WebhookStarter(temporal_client, engine)) == 3
            await refresh_oldest_undelivered(engine)
            for seq in (1, 2, 3):
                await temporal_client.get_workflow_handle(
                    delivery_workflow_id(receiver.url, org, seq)).result()
            await refresh_oldest_undelivered(engine)
    finally:
        await receiver.stop()
        await engine.db.client.drop_database(engine.db.db.name)
        await engine.db.close()

    assert len(receiver.received) == 3
    seen = [c for c in commands.seen if c[1] == "notifications"]
    assert seen, "the listener saw no notification command"
    assert not [c for c in commands.seen if c[0] == "findAndModify"]
    unindexed = [(name, collection, query) for name, collection, query in commands.seen
                 if not index_backed(collection, query)]
    assert unindexed == []


async def test_a_customer_token_costs_one_lookup_by_id_per_request(
    runtime: Runtime, temporal_client: Client
) -> None:
    """Revocations are read on every request (SPEC §5.10): by `_id`, never a scan."""
    commands = Commands()
    engine = runtime_on(runtime, billing_portal_secret="portal-key-shapes-0123456789abcdef01",
                        client_options={"event_listeners": [commands]})
    org = f"org-shapes-{uuid.uuid4().hex[:8]}"
    try:
        async with app_client(engine, temporal_client) as api:
            assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
            issued = (await api.post(f"/v1/orgs/{org}/tokens",
                                     json={"scopes": ["read"]})).json()
            commands.seen.clear()
            read = await api.get(f"/v1/orgs/{org}/meter",
                                 headers={"Authorization": f"Bearer {issued['token']}"})
            assert read.status_code == 200, read.text
            assert (await api.delete(f"/v1/tokens/{issued['token_id']}")).status_code == 204
    finally:
        await engine.db.close()

    tokens = [c for c in commands.seen if c[1] == "customer_tokens"]
    assert tokens[0] == ("find", "customer_tokens", {"_id": issued["token_id"]})
    assert [c[0] for c in tokens] == ["find", "update", "find"]  # the read, then the revocation
    assert all(index_backed(collection, query) for _, collection, query in commands.seen)
