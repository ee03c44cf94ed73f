"""Stripe events end to end: signed HTTP request -> StripeEventWorkflow -> MongoDB -> HTTP read."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from http_helpers import balance, notification_types
from stripe_fake import StripeFake
from stripe_payloads import (
    PACK_PRICE,
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
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client, WorkflowFailureError

from billing.models import StripeEvent, StripeEventOutcome
from billing.runtime import Runtime
from workflows.stripe_event import StripeEventWorkflow

PACK = "pack_500k"
T0 = 1_780_000_000


async def outcome(client: Client, evt: dict[str, Any]) -> StripeEventOutcome:
    handle = client.get_workflow_handle(f"stripe-{evt['id']}", result_type=StripeEventOutcome)
    result: StripeEventOutcome = await handle.result()
    return result


async def send(api: httpx.AsyncClient, client: Client, evt: dict[str, Any]) -> StripeEventOutcome:
    response = await deliver(api, evt)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "started", "workflow_id": f"stripe-{evt['id']}"}
    return await outcome(client, evt)


async def entries(api: httpx.AsyncClient, org: str) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/orgs/{org}/ledger", params={"limit": 100})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["entries"]
    return found


async def event_view(api: httpx.AsyncClient, evt: dict[str, Any]) -> dict[str, Any]:
    response = await api.get(f"/v1/stripe-events/{evt['id']}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def purchase(api: httpx.AsyncClient, client: Client, org: str, *, pi: str,
                   ch: str | None = None) -> None:
    """A pack bought without Checkout: `payment_intent.succeeded` with metadata."""
    result = await send(api, client, event("payment_intent.succeeded",
                                           payment_intent(pi=pi, meta=metadata(org, PACK),
                                                          charge=ch)))
    assert result.outcome == "applied"


# ---- pack purchases ------------------------------------------------------------------------------


async def test_checkout_and_payment_intent_credit_once_under_concurrent_redelivery(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    pi = new_id("pi")
    meta = metadata(org, PACK)
    session_event = event("checkout.session.completed",
                          stripe_fake.checkout(checkout_session(payment_intent=pi, meta=meta)))
    intent_event = event("payment_intent.succeeded", payment_intent(pi=pi, meta=meta))

    responses = await asyncio.gather(
        *(deliver(api, evt) for evt in (session_event, intent_event) for _ in range(3))
    )

    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert Counter(r.json()["status"] for r in responses) == {"started": 2, "duplicate": 4}
    outcomes = [await outcome(temporal_client, e) for e in (session_event, intent_event)]
    assert sorted(o.outcome for o in outcomes) == ["applied", "duplicate"]
    assert await balance(api, org) == 500000
    credits = [e for e in await entries(api, org) if e["key"] == f"payment:{pi}"]
    assert [(e["kind"], e["amount"]) for e in credits] == [("topup", 500000)]
    lots = (await api.get(f"/v1/orgs/{org}/balance")).json()["lots"]
    assert [(lot["units"], lot["remaining"]) for lot in lots] == [(500000, 500000)]
    assert lots[0]["expires_at"] is not None  # expiry_days = 365
    for evt in (session_event, intent_event):
        view = await event_view(api, evt)
        assert view["status"] == "COMPLETED"
        assert view["org_id"] == org
        assert view["outcome"] in ("applied", "duplicate")


async def test_redelivery_after_history_is_gone_writes_nothing(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, org, db
):
    pi = new_id("pi")
    evt = event("payment_intent.succeeded", payment_intent(pi=pi, meta=metadata(org, PACK)))
    assert (await send(api, temporal_client, evt)).outcome == "applied"
    duplicate = await deliver(api, evt)
    assert duplicate.json() == {"status": "duplicate", "workflow_id": f"stripe-{evt['id']}"}

    async def redeliver_once_history_is_gone() -> StripeEventOutcome:
        """Delete the run (the dev server does it in the background), then deliver until the
        receiver starts a new workflow; deliveries in between answer `duplicate`."""
        await temporal_client.workflow_service.delete_workflow_execution(
            DeleteWorkflowExecutionRequest(
                namespace=temporal_client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=f"stripe-{evt['id']}"),
            )
        )
        for _ in range(300):
            response = await deliver(api, evt)
            assert response.status_code == 200, response.text
            if response.json()["status"] == "started":
                return await outcome(temporal_client, evt)
            await asyncio.sleep(0.2)
        raise AssertionError("the workflow history was not deleted")

    # A fresh run of the same event (another workflow id, as after retention): the event
    # record answers and nothing is written again.
    rerun = await temporal_client.execute_workflow(
        StripeEventWorkflow.run,
        StripeEvent.model_validate({**evt, "object": evt["data"]["object"]}),
        id=f"rerun-{evt['id']}", task_queue=stripe_runtime.settings.temporal_task_queue,
        result_type=StripeEventOutcome)
    assert (rerun.outcome, rerun.written) == ("duplicate", [])
    # Gone from Temporal and its record lost too: the ledger key alone still holds.
    await db.stripe_events.delete_one({"_id": evt["id"]})
    last = await redeliver_once_history_is_gone()
    assert last.outcome == "duplicate"
    assert last.written == []
    assert await balance(api, org) == 500000
    assert len([e for e in await entries(api, org) if e["kind"] == "topup"]) == 1


async def test_unpaid_and_non_pack_checkouts_change_nothing(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    unpaid = event("checkout.session.completed",
                   checkout_session(payment_intent=new_id("pi"), meta=metadata(org, PACK),
                                    paid=False))
    result = await send(api, temporal_client, unpaid)
    assert (result.outcome, result.written) == ("ignored", [])

    pi = stripe_fake.add(payment_intent(pi=new_id("pi"), meta={}))["id"]
    session = checkout_session(payment_intent=pi, meta=metadata(org))
    stripe_fake.line_items[session["id"]] = [
        {"id": new_id("li"), "object": "item", "price": {"id": "price_tshirt"}, "quantity": 1}
    ]
    not_a_pack = event("checkout.session.completed", session)
    result = await send(api, temporal_client, not_a_pack)
    # It names an organization but bought no pack: never silent (SPEC 5.5).
    assert (result.outcome, result.written) == ("unresolved", ["notification purchase.unresolved"])
    assert (await event_view(api, not_a_pack))["outcome"] == "unresolved"
    assert (await api.get(f"/v1/orgs/{org}/balance")).json()["balance"] == 0

    bare = stripe_fake.add(payment_intent(pi=new_id("pi"), meta={}))["id"]
    nobody = checkout_session(payment_intent=bare, meta={})
    stripe_fake.line_items[nobody["id"]] = stripe_fake.line_items[session["id"]]
    result = await send(api, temporal_client, event("checkout.session.completed", nobody))
    assert (result.outcome, result.written) == ("ignored", [])  # nothing of billing in it


async def test_metadata_fallbacks_payment_intent_then_line_item_price(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    # The session names nobody; the payment intent does, in the seed's spellings.
    pi = stripe_fake.add(payment_intent(pi=new_id("pi"),
                                        meta=metadata(org, PACK, seed_spelling=True)))["id"]
    first = event("checkout.session.completed",
                  stripe_fake.checkout(checkout_session(payment_intent=pi, meta={})))
    assert (await send(api, temporal_client, first)).outcome == "applied"

    # The session names the org (seed spelling); the pack comes from the line item's price.
    pi2 = stripe_fake.add(payment_intent(pi=new_id("pi"), meta={}))["id"]
    session = checkout_session(payment_intent=pi2, meta={"organizationId": org})
    stripe_fake.line_items[session["id"]] = [
        {"id": new_id("li"), "object": "item", "price": {"id": PACK_PRICE}, "quantity": 1}
    ]
    second = event("checkout.session.completed", session)
    result = await send(api, temporal_client, second)
    assert (result.outcome, result.org_id) == ("applied", org)
    assert await balance(api, org) == 1000000

    # Every pack line of a cart is credited, each in its own lot.
    session = checkout_session(payment_intent=None, meta=metadata(org))
    stripe_fake.line_items[session["id"]] = [
        {"id": new_id("li"), "object": "item", "price": {"id": PACK_PRICE}, "quantity": 1},
        {"id": new_id("li"), "object": "item", "price": {"id": PACK_PRICE}, "quantity": 2},
    ]
    cart = await send(api, temporal_client, event("checkout.session.completed", session))
    assert cart.outcome == "applied"
    assert await balance(api, org) == 2500000
    keys = [e["key"] for e in await entries(api, org)]
    assert f"checkout:{session['id']}" in keys and f"checkout:{session['id']}:2" in keys


# ---- refunds and disputes ------------------------------------------------------------------------


async def test_partial_refunds_claw_back_exactly_and_replays_add_nothing(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    pi, ch = new_id("pi"), new_id("ch")
    await purchase(api, temporal_client, org, pi=pi, ch=ch)
    first = refund(charge=ch, pi=pi, amount=2450)
    assert (await send(api, temporal_client, event("refund.created", first))).outcome == "applied"

    second = refund(charge=ch, pi=pi, amount=2450)
    stripe_fake.refunds[ch] = [first, second]  # the payload carries none: listed through the API
    listed = await send(api, temporal_client, event("charge.refunded", charge(ch=ch, pi=pi)))
    assert listed.outcome == "applied"
    assert listed.written == [f"ledger refund:{second['id']} -250000"]

    replay = event("charge.refunded", charge(ch=ch, pi=pi, refunds=[first, second]))
    assert (await send(api, temporal_client, replay)).outcome == "duplicate"
    refunds = [e["amount"] for e in await entries(api, org) if e["kind"] == "refund"]
    assert refunds == [-250000, -250000]
    assert await balance(api, org) == 0


async def test_refund_whose_purchase_cannot_be_told_writes_nothing_and_notifies(
    api, stripe_worker, temporal_client, org
):
    """No lot, and the charge names no payment intent (so no Checkout session can be found):
    nothing is written and the organization is told (`refund.unresolved`)."""
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    before = await balance(api, org)
    ch = new_id("ch")
    evt = event("charge.refunded", charge(ch=ch, pi=None, amount=1234, meta=metadata(org),
                                          refunds=[refund(charge=ch, pi=None, amount=1234)]))
    result = await send(api, temporal_client, evt)
    assert (result.outcome, result.org_id) == ("unresolved", org)
    assert await balance(api, org) == before
    assert not [e for e in await entries(api, org) if e["kind"] == "refund"]
    assert (await notification_types(api, org))["refund.unresolved"] == 1


async def test_refund_of_a_charge_that_bought_no_pack_is_ignored(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    ch, pi = new_id("ch"), new_id("pi")
    stripe_fake.add(payment_intent(pi=pi, meta=metadata(org)))  # no pack, no Checkout session
    evt = event("charge.refunded", charge(ch=ch, pi=pi, meta=metadata(org),
                                          refunds=[refund(charge=ch, pi=pi, amount=4900)]))
    result = await send(api, temporal_client, evt)
    assert result.outcome == "ignored", result
    assert (await api.get(f"/v1/orgs/{org}/balance")).status_code == 404


async def waited(client: Client, evt: dict[str, Any]) -> int:
    """How many times the run looked for its purchase (it waits durably between looks)."""
    history = await client.get_workflow_handle(f"stripe-{evt['id']}").fetch_history()
    return sum(1 for e in history.events if e.HasField("timer_started_event_attributes"))


async def test_refund_of_a_pack_delivered_before_its_purchase_waits_for_it(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    """The payment bought a pack that is not credited yet: the refund waits for it (durably,
    polling) instead of being recorded, and claws back once the credit lands."""
    ch, pi = new_id("ch"), new_id("pi")
    stripe_fake.add(payment_intent(pi=pi, meta=metadata(org, PACK), charge=ch))
    early = event("charge.refunded", charge(ch=ch, pi=pi, meta=metadata(org),
                                            refunds=[refund(charge=ch, pi=pi, amount=4900)]))
    assert (await deliver(api, early)).status_code == 200
    handle = temporal_client.get_workflow_handle(f"stripe-{early['id']}")
    for _ in range(50):
        if await handle.query("waiting_for"):
            break
        await asyncio.sleep(0.1)
    assert "to be credited" in (await handle.query("waiting_for") or "")
    assert (await event_view(api, early))["status"] == "RUNNING"
    await purchase(api, temporal_client, org, pi=pi, ch=ch)
    assert (await outcome(temporal_client, early)).outcome == "applied"
    assert await waited(temporal_client, early) >= 1
    assert sorted(e["amount"] for e in await entries(api, org)) == [-500000, 500000]
    assert await balance(api, org) == 0


async def test_a_refund_whose_purchase_never_comes_fails_visibly_after_72_hours(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    ch, pi = new_id("ch"), new_id("pi")
    stripe_fake.add(payment_intent(pi=pi, meta=metadata(org, PACK), charge=ch))
    late = event("refund.created", refund(charge=ch, pi=pi, amount=4900),
                 created=int(time.time()) - 73 * 3600)
    assert (await deliver(api, late)).status_code == 200
    with pytest.raises(WorkflowFailureError) as failed:
        await outcome(temporal_client, late)
    assert "PURCHASE_NOT_CREDITED" in str(failed.value.cause) or \
        "still waiting" in str(failed.value.cause)
    assert (await event_view(api, late))["status"] == "FAILED"


async def test_an_unresolved_purchase_run_again_after_its_customer_is_linked_credits_once(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    """A paid checkout naming no organization, of a customer not linked yet: unresolved. Run
    again (as `billing replay` does) once a subscription links the customer, it credits, once."""
    cus, pi = new_id("cus"), new_id("pi")
    stripe_fake.add(payment_intent(pi=pi, meta={}))
    session = checkout_session(payment_intent=pi, meta={}, customer=cus)
    early = event("checkout.session.completed", stripe_fake.checkout(session))
    first = await send(api, temporal_client, early)
    assert first.outcome == "unresolved"
    link = event("customer.subscription.created",
                 subscription(sub=new_id("sub"), customer=cus, price="price_pro_monthly",
                              meta=metadata(org)))
    assert (await send(api, temporal_client, link)).outcome == "applied"
    for run in ("again", "and-again"):
        result = await temporal_client.execute_workflow(
            StripeEventWorkflow.run, StripeEvent.from_stripe(early),
            id=f"stripe-{early['id']}-{run}", task_queue=stripe_worker.task_queue,
            result_type=StripeEventOutcome)
        assert result.outcome == ("applied" if run == "again" else "duplicate")
    assert [e["amount"] for e in await entries(api, org)] == [500000]
    assert (await event_view(api, early))["outcome"] == "applied"


async def test_dispute_lifecycle_claws_back_once_and_reinstates_exactly(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    pi, ch, dp = new_id("pi"), new_id("ch"), new_id("dp")
    await purchase(api, temporal_client, org, pi=pi)  # the lot knows the payment intent only
    # The disputes name the charge only: the workflow reads it for its payment intent.
    stripe_fake.add(charge(ch=ch, pi=pi, refunds=[]))

    def dispute_event(kind: str, status: str) -> dict[str, Any]:
        return event(f"charge.dispute.{kind}",
                     dispute(dp=dp, ch=ch, pi=None, amount=4900, status=status))

    opened = await send(api, temporal_client, dispute_event("created", "needs_response"))
    assert opened.written == ["notification dispute.opened"]
    withdrawn = [
        await send(api, temporal_client, dispute_event("funds_withdrawn", "needs_response"))
        for _ in range(2)
    ]
    assert [w.outcome for w in withdrawn] == ["applied", "duplicate"]
    assert await balance(api, org) == 0
    reinstated = await send(api, temporal_client, dispute_event("funds_reinstated", "won"))
    assert reinstated.outcome == "applied"
    closed = await send(api, temporal_client, dispute_event("closed", "won"))
    assert closed.outcome == "duplicate"
    amounts = [(e["kind"], e["amount"]) for e in reversed(await entries(api, org))]
    assert amounts == [("topup", 500000), ("dispute", -500000), ("reinstatement", 500000)]
    assert await balance(api, org) == 500000
    notes = await notification_types(api, org)
    assert [notes[t] for t in ("dispute.opened", "dispute.lost", "dispute.reinstated")] == [1, 1, 1]


async def test_reinstatement_before_its_withdrawal_voids_it(
    api, stripe_worker, temporal_client, org
):
    """Stripe does not order deliveries: a reinstatement that arrives first voids the
    withdrawal, so the pair nets to zero whichever lands first and nothing is clawed back."""
    pi, ch, dp = new_id("pi"), new_id("ch"), new_id("dp")
    await purchase(api, temporal_client, org, pi=pi, ch=ch)
    reinstated = event("charge.dispute.funds_reinstated",
                       dispute(dp=dp, ch=ch, pi=pi, amount=4900, status="won"))
    withdrawn = event("charge.dispute.funds_withdrawn",
                      dispute(dp=dp, ch=ch, pi=pi, amount=4900, status="needs_response"))
    assert (await send(api, temporal_client, reinstated)).outcome == "applied"
    assert (await send(api, temporal_client, withdrawn)).outcome == "duplicate"
    assert [e["amount"] for e in await entries(api, org)] == [500000]
    assert await balance(api, org) == 500000
    notes = await notification_types(api, org)
    assert (notes["dispute.reinstated"], notes["dispute.lost"]) == (1, 1)


# ---- subscriptions and invoices ------------------------------------------------------------------


async def subscription_view(api: httpx.AsyncClient, org: str) -> dict[str, Any]:
    response = await api.get(f"/v1/orgs/{org}/subscription")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def test_stale_subscription_events_and_same_second_read_from_stripe(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    sub, cus = new_id("sub"), new_id("cus")

    def updated(price: str, created: int, event_id: str | None = None) -> dict[str, Any]:
        obj = subscription(sub=sub, customer=cus, price=price, meta=metadata(org))
        return event("customer.subscription.updated", obj, created=created, event_id=event_id)

    assert (await send(api, temporal_client, updated("price_pro_monthly", T0 + 10))).outcome \
        == "applied"
    old = updated("price_starter_monthly", T0)
    assert (await send(api, temporal_client, old)).outcome == "stale"
    assert (await event_view(api, old))["outcome"] == "stale"
    assert (await subscription_view(api, org))["plan_id"] == "pro"

    # Two events of one second: their ids say nothing of their order (SPEC 5.4). The second
    # to arrive reads the subscription from Stripe, which holds it on `pro` now.
    stripe_fake.add(subscription(sub=sub, customer=cus, price="price_pro_monthly",
                                 meta=metadata(org)))
    base = new_id("evt")
    greater_id = await send(api, temporal_client,
                            updated("price_starter_monthly", T0 + 20, f"{base}_2"))
    smaller_id = await send(api, temporal_client,
                            updated("price_starter_monthly", T0 + 20, f"{base}_1"))
    assert (greater_id.outcome, smaller_id.outcome) == ("applied", "applied")
    view = await subscription_view(api, org)
    assert view == {
        "org_id": org, "plan_id": "pro", "status": "active",
        "current_period_start": "2026-05-28T20:26:40Z", "past_due_since": None,
        "stripe_customer_id": cus, "stripe_subscription_id": sub,
    }
    assert (await notification_types(api, org))["plan.changed"] >= 2


async def test_invoice_and_subscription_families_are_independent_and_past_due_is_kept(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    sub, cus = new_id("sub"), new_id("cus")
    linked = event("customer.subscription.created",
                   subscription(sub=sub, customer=cus, price="price_pro_monthly",
                                meta=metadata(org)), created=T0 + 100)
    assert (await send(api, temporal_client, linked)).outcome == "applied"

    def failed(created: int) -> dict[str, Any]:  # no metadata: the customer link resolves it
        return event("invoice.payment_failed", invoice(customer=cus, sub=sub), created=created)

    # Older than the subscription marker, but invoices keep their own marker.
    first = await send(api, temporal_client, failed(T0 + 50))
    assert (first.outcome, first.org_id) == ("applied", org)
    assert (await send(api, temporal_client, failed(T0 + 60))).outcome == "applied"
    view = await subscription_view(api, org)
    assert (view["status"], view["past_due_since"]) == ("past_due", "2026-05-28T20:27:30Z")
    assert (await notification_types(api, org))["payment.failed"] == 2

    stripe_fake.add(subscription(sub=sub, customer=cus, price="price_starter_monthly"))
    paid = await send(api, temporal_client,
                      event("invoice.paid", invoice(customer=cus, sub=sub), created=T0 + 70))
    assert paid.outcome == "applied"
    view = await subscription_view(api, org)
    assert (view["status"], view["past_due_since"], view["plan_id"]) == ("active", None, "starter")
    assert (await send(api, temporal_client, failed(T0 + 55))).outcome == "stale"
    assert (await subscription_view(api, org))["status"] == "active"
    # And an invoice does not make a later subscription event stale.
    newer = event("customer.subscription.updated",
                  subscription(sub=sub, customer=cus, price="price_pro_monthly"),
                  created=T0 + 101)
    assert (await send(api, temporal_client, newer)).outcome == "applied"
    assert (await subscription_view(api, org))["plan_id"] == "pro"
    # A failed invoice of another subscription of the customer, ended (Stripe says so when the
    # engine asks about a subscription it never heard of), changes no status: it notifies.
    replaced = stripe_fake.add(subscription(sub=new_id("sub"), customer=cus,
                                            price="price_starter_monthly", status="canceled"))
    other = event("invoice.payment_failed", invoice(customer=cus, sub=replaced["id"]),
                  created=T0 + 80)
    result = await send(api, temporal_client, other)
    assert result.outcome == "applied" and "notification payment.failed" in result.written
    assert (await subscription_view(api, org))["status"] == "active"
    assert (await notification_types(api, org))["payment.failed"] == 3


async def test_subscription_checkout_reads_the_real_status_then_deletion_resets(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    sub, cus = new_id("sub"), new_id("cus")
    stripe_fake.add(subscription(sub=sub, customer=cus, price="price_pro_monthly",
                                 status="trialing", meta=metadata(org)))
    session = checkout_session(payment_intent=None, meta={}, mode="subscription",
                               customer=cus, subscription=sub)
    result = await send(api, temporal_client,
                        event("checkout.session.completed", session, created=T0 + 1))
    assert (result.outcome, result.org_id) == ("applied", org)
    view = await subscription_view(api, org)
    assert (view["status"], view["plan_id"], view["stripe_customer_id"]) == ("trialing", "pro", cus)

    unknown = event("customer.subscription.updated",
                    subscription(sub=sub, customer=cus, price="price_mystery"), created=T0 + 2)
    assert (await send(api, temporal_client, unknown)).outcome == "applied"
    assert (await subscription_view(api, org))["plan_id"] == "pro"  # last known plan kept
    assert (await notification_types(api, org))["plan.unresolved"] == 1

    deleted = event("customer.subscription.deleted",
                    subscription(sub=sub, customer=cus, price="price_pro_monthly",
                                 status="canceled"), created=T0 + 3)
    assert (await send(api, temporal_client, deleted)).outcome == "applied"
    view = await subscription_view(api, org)
    assert (view["status"], view["plan_id"]) == ("canceled", "free")
    assert (await notification_types(api, org))["subscription.expired"] == 1

    gone = event("customer.deleted", {"id": cus, "object": "customer", "metadata": {}},
                 created=T0 + 4)
    assert (await send(api, temporal_client, gone)).outcome == "applied"
    view = await subscription_view(api, org)
    assert (view["stripe_customer_id"], view["stripe_subscription_id"]) == (None, None)


async def test_the_end_of_a_replaced_subscription_keeps_the_new_plan(
    api, stripe_worker, temporal_client, org
):
    """An upgrade by a new subscription: the old one's cancellation arrives afterwards and must
    not move the organization to the default plan nor reset its week."""
    cus, old, new = new_id("cus"), new_id("sub"), new_id("sub")
    starter = subscription(sub=old, customer=cus, price="price_starter_monthly",
                           meta=metadata(org))
    pro = subscription(sub=new, customer=cus, price="price_pro_monthly", meta=metadata(org))
    for n, obj in enumerate((starter, pro), start=1):
        result = await send(api, temporal_client,
                            event("customer.subscription.created", obj, created=T0 + n))
        assert result.outcome == "applied"
    usage = await api.post("/v1/usage", json={"org_id": org, "run_id": "r1", "units": 70})
    assert usage.status_code == 200, usage.text
    ended = subscription(sub=old, customer=cus, price="price_starter_monthly",
                         status="canceled", meta=metadata(org))
    result = await send(api, temporal_client,
                        event("customer.subscription.deleted", ended, created=T0 + 3))
    assert result.outcome == "applied"
    view = await subscription_view(api, org)
    assert (view["plan_id"], view["status"], view["stripe_subscription_id"]) == (
        "pro", "active", new)
    assert (await api.get(f"/v1/orgs/{org}/meter")).json()["used"] == 70


@pytest.mark.parametrize("registered_first", [True, False])
async def test_a_past_due_subscription_refuses_holds_and_the_gate_until_paid(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org, registered_first
):
    """A failed invoice leaves the subscription past due beyond its grace: holds are refused
    `PAYMENT_PAST_DUE`, as the gate refuses runs, until the invoice is paid; the same when the
    organization registers only after its subscription's events (their standing is kept)."""
    sub, cus = new_id("sub"), new_id("cus")
    since = int(time.time()) - 8 * 86_400  # the grace is 7 days

    async def hold(hold_id: str) -> httpx.Response:
        return await api.post(f"/v1/orgs/{org}/holds", json={"hold_id": hold_id, "units": 10})

    if registered_first:
        assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    created = event("customer.subscription.created",
                    subscription(sub=sub, customer=cus, price="price_pro_monthly",
                                 meta=metadata(org)), created=since - 60)
    assert (await send(api, temporal_client, created)).outcome == "applied"
    assert (await hold("before")).status_code == 201
    failed = event("invoice.payment_failed", invoice(customer=cus, sub=sub), created=since)
    assert (await send(api, temporal_client, failed)).outcome == "applied"
    if not registered_first:
        assert (await api.put(f"/v1/orgs/{org}")).status_code == 200
    refused = await hold("past-due")
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "PAYMENT_PAST_DUE")
    gate = (await api.get(f"/v1/orgs/{org}/quota")).json()
    assert (gate["allowed"], gate["reason"], gate["held"]) == (False, "PAYMENT_PAST_DUE", 10)

    stripe_fake.add(subscription(sub=sub, customer=cus, price="price_pro_monthly"))
    paid = event("invoice.paid", invoice(customer=cus, sub=sub), created=since + 60)
    assert (await send(api, temporal_client, paid)).outcome == "applied"
    assert (await hold("paid")).status_code == 201
    assert (await api.get(f"/v1/orgs/{org}/quota")).json()["allowed"] is True


async def test_dunning_moves_long_past_due_to_unpaid_and_spares_recovered(
    api, stripe_worker, temporal_client, stripe_runtime: Runtime, org, db
):
    from datetime import UTC, datetime, timedelta

    from billing.models import DunningPageResult
    from workflows.dunning import DunningWorkflow

    recovered = f"{org}-ok"
    long_ago = datetime.now(UTC) - timedelta(days=30)
    for who, status in ((org, "past_due"), (recovered, "active")):
        assert (await api.put(f"/v1/orgs/{who}")).status_code == 201
        await db.accounts.update_one({"_id": who}, {"$set": {"plan_id": "pro"}})
        since = long_ago if status == "past_due" else None
        await db.subscriptions.insert_one({"_id": who, "status": status,
                                           "past_due_since": since})
        await db.stripe_subscriptions.insert_one({"_id": new_id("sub"), "org_id": who,
                                                  "status": status, "plan_id": "pro",
                                                  "past_due_since": since})
    result = await temporal_client.execute_workflow(
        DunningWorkflow.run, id=f"dunning-test-{org}", result_type=DunningPageResult,
        task_queue=stripe_runtime.settings.temporal_task_queue)
    assert result.unpaid >= 1
    assert ((await subscription_view(api, org))["status"],
            (await subscription_view(api, org))["plan_id"]) == ("unpaid", "free")
    assert ((await subscription_view(api, recovered))["status"],
            (await subscription_view(api, recovered))["plan_id"]) == ("active", "pro")


async def test_reads_answer_404_and_none(api, stripe_worker, org):
    missing = await api.get(f"/v1/stripe-events/{new_id('evt')}")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "NOT_FOUND")
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    view = await subscription_view(api, org)
    assert (view["status"], view["plan_id"], view["stripe_customer_id"]) == ("none", "free", None)
    assert (await api.get("/v1/orgs/nobody-here/subscription")).status_code == 404


async def test_one_payment_intent_is_credited_once_even_when_two_events_name_two_orgs(
    api, stripe_worker, stripe_fake: StripeFake, temporal_client, org
):
    """Session and payment intent metadata disagree on the organization, and both events race:
    the unique purchase index lets exactly one of them credit."""
    pi, other = new_id("pi"), f"{org}-other"
    meta_a, meta_b = metadata(org, PACK), metadata(other, PACK)
    racing = [
        event("checkout.session.completed",
              stripe_fake.checkout(checkout_session(payment_intent=pi, meta=meta_a))),
        event("payment_intent.succeeded", payment_intent(pi=pi, meta=meta_b)),
    ]
    await asyncio.gather(*(deliver(api, evt) for evt in racing))
    results = [await outcome(temporal_client, evt) for evt in racing]
    assert sorted(r.outcome for r in results) == ["applied", "duplicate"]
    credited = [await balance(api, who) for who in (org, other)
                if (await api.get(f"/v1/orgs/{who}/balance")).status_code == 200]
    assert sorted(credited) in ([0, 500000], [500000])
