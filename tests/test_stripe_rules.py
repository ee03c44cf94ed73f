"""The pure rules of reading Stripe events (billing/stripe_events.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from stripe_payloads import resource, subscription

from billing import stripe_events as se


def test_markers_order_by_created_then_event_id():
    marker = se.Marker(100, "evt_b")
    assert se.is_stale(marker, se.Marker(99, "evt_z"))
    assert se.is_stale(marker, se.Marker(100, "evt_a"))
    assert se.is_stale(marker, se.Marker(100, "evt_b"))  # the same event again
    assert not se.is_stale(marker, se.Marker(100, "evt_c"))
    assert not se.is_stale(None, se.Marker(1, "evt_a"))
    assert se.Marker.from_doc(marker.to_doc()) == marker
    assert se.Marker.from_doc(None) is None


def test_families():
    assert se.family("customer.subscription.updated", {}) == se.SUBSCRIPTION_FAMILY
    assert se.family("customer.deleted", {}) == se.SUBSCRIPTION_FAMILY
    assert se.family("checkout.session.completed", {"mode": "subscription"}) == "subscription"
    assert se.family("checkout.session.completed", {"mode": "payment"}) is None
    assert se.family("invoice.paid", {}) == se.INVOICE_FAMILY
    assert se.family("charge.refunded", {}) is None
    assert se.is_handled("charge.dispute.funds_reinstated")
    assert not se.is_handled("plan.created")


def test_org_and_pack_from_metadata_in_order_with_seed_spellings():
    session = {"metadata": {"organizationId": "acme"}}
    intent = {"metadata": {"org_id": "other", "packId": "pack_500k"}}
    assert se.org_from(session, intent) == "acme"
    assert se.pack_from(session, intent) == "pack_500k"
    assert se.org_from({"metadata": {"org_id": "bad id!"}}, intent) == "other"
    assert se.org_from({"metadata": {"org_id": {"$ne": 1}}}, None) is None
    assert se.org_from({"metadata": None}, {}) is None


def test_pack_from_line_items_guards_ambiguity(config):
    pack = {"price": {"id": "price_pack_500k"}, "quantity": 2}
    other = {"price": "price_tshirt", "quantity": 1}
    chosen = se.pack_from_line_items(config, [other, pack])
    assert (chosen.pack.id if chosen.pack else None, chosen.quantity) == ("pack_500k", 2)
    assert se.pack_from_line_items(config, [other]).pack is None
    twice = se.pack_from_line_items(config, [pack, pack])
    assert (twice.pack, twice.ambiguous) == (None, True)


def test_plan_from_prices_and_ended_statuses(config):
    sub = subscription(sub="sub_1", customer="cus_1", price="price_pro_yearly")
    assert se.plan_for_subscription(config, sub) == se.PlanChoice("pro", "active")
    unknown = subscription(sub="sub_1", customer="cus_1", price="price_gone")
    assert se.plan_for_subscription(config, unknown) == se.PlanChoice(None, "active",
                                                                      ("price_gone",))
    expired = subscription(sub="sub_1", customer="cus_1", price="price_pro_yearly",
                           status="incomplete_expired")
    assert se.plan_for_subscription(config, expired) == se.PlanChoice("free", "canceled")
    assert se.plan_for_subscription(config, sub, deleted=True) == se.PlanChoice("free", "canceled")


def test_period_start_from_items_else_top_level():
    sub = subscription(sub="sub_1", customer="cus_1", price="p", period_start=1_780_000_000)
    assert se.period_start(sub) == datetime(2026, 5, 28, 20, 26, 40, tzinfo=UTC)
    assert se.period_start({"items": {"data": []}, "current_period_start": 86400}) == datetime(
        1970, 1, 2, tzinfo=UTC)
    assert se.period_start({}) is None


def test_invoice_subscription_new_and_old_shapes():
    new = resource("invoice")
    new["parent"]["subscription_details"]["subscription"] = "sub_new"
    assert se.invoice_subscription(new) == "sub_new"
    assert se.invoice_subscription({"parent": None, "subscription": "sub_old"}) == "sub_old"
    assert se.invoice_subscription({"subscription": {"id": "sub_exp"}}) == "sub_exp"


def test_refunds_are_listed_when_not_carried():
    charge = resource("charge")
    assert se.charge_refunds(charge) == []
    charge["refunds"]["has_more"] = True
    assert se.charge_refunds(charge) is None
    del charge["refunds"]
    assert se.charge_refunds(charge) is None
    assert not se.counts_as_refunded({"amount": 100, "status": "failed"})
    assert se.counts_as_refunded({"amount": 100, "status": "pending"})
