"""The pure decisions on Stripe events (billing/stripe/): milliseconds, no server."""

from __future__ import annotations

import doctest
from datetime import UTC, datetime, timedelta

import pytest
from stripe_payloads import resource, subscription

from billing.config import EXAMPLE_CONFIG, BillingConfig, PackConfig, parse_config
from billing.metering import plan_quota
from billing.stripe import events as ev
from billing.stripe import orgs as orgs_module
from billing.stripe.disputes import DisputeAction, dispute_action
from billing.stripe.invoices import invoice_effect, invoice_subscription
from billing.stripe.objects import org_from, pack_from
from billing.stripe.orgs import needs_customer_link, resolve_org
from billing.stripe.purchases import Verdict, line_key, purchase_key, resolve_purchase
from billing.stripe.purchases import purchase_behind_charge as resolve_behind
from billing.stripe.refunds import RefundAction, charge_refunds, refund_action
from billing.stripe.subscriptions import (
    PlanChoice,
    SubscriptionView,
    period_start,
    plan_for_subscription,
    standing,
)


def test_markers_order_by_created_then_event_id():
    marker = ev.Marker(100, "evt_b")
    assert ev.is_stale(marker, ev.Marker(99, "evt_z"))
    assert ev.is_stale(marker, ev.Marker(100, "evt_a"))
    assert ev.is_stale(marker, ev.Marker(100, "evt_b"))  # the same event again
    assert not ev.is_stale(marker, ev.Marker(100, "evt_c"))
    assert not ev.is_stale(None, ev.Marker(1, "evt_a"))
    assert ev.Marker.from_doc(marker.to_doc()) == marker
    assert ev.Marker.from_doc(None) is None


def test_families_and_handled_types():
    assert ev.family("customer.subscription.updated", {}) == ev.SUBSCRIPTION_FAMILY
    assert ev.family("customer.deleted", {}) == ev.SUBSCRIPTION_FAMILY
    assert ev.family("checkout.session.completed", {"mode": "subscription"}) == "subscription"
    assert ev.family("checkout.session.completed", {"mode": "payment"}) is None
    assert ev.family("invoice.paid", {}) == ev.INVOICE_FAMILY
    assert ev.family("charge.refunded", {}) is None
    for handled in ("charge.dispute.funds_reinstated", "checkout.session.async_payment_succeeded",
                    "checkout.session.async_payment_failed", "refund.failed", "refund.updated",
                    "charge.refund.updated"):
        assert ev.is_handled(handled)
    assert not ev.is_handled("plan.created")


def test_org_and_pack_from_metadata_in_order_with_seed_spellings():
    session = {"metadata": {"organizationId": "acme"}}
    intent = {"metadata": {"org_id": "other", "packId": "pack_500k"}}
    assert org_from(session, intent) == "acme"
    assert pack_from(session, intent) == "pack_500k"
    assert org_from({"metadata": {"org_id": "bad id!"}}, intent) == "other"
    assert org_from({"metadata": {"org_id": {"$ne": 1}}}, None) is None
    assert org_from({"metadata": None}, {}) is None


def test_the_organization_in_the_order_of_the_specification():
    """SPEC §5.5: the engine's record, the event object's metadata, the payment intent's, a
    known subscription's organization, the customer link last; a link never overrides
    metadata."""
    a, b = {"metadata": {"org_id": "org-a"}}, {"metadata": {"org_id": "org-b"}}
    bare = {"metadata": {}}
    assert resolve_org(objects=(bare, a), payment_intent=b, subscription_org="org-c",
                       customer_org="org-d") == "org-a"
    assert resolve_org(objects=(bare, None), payment_intent=a, subscription_org="org-c",
                       customer_org="org-d") == "org-a"
    assert resolve_org(objects=(bare,), subscription_org="org-c", customer_org="org-d") == "org-c"
    assert resolve_org(objects=(bare,), customer_org="org-d") == "org-d"
    assert resolve_org(named="org-a", objects=(b,), customer_org="org-d") == "org-a"
    assert resolve_org(recorded="org-r", named="org-a", customer_org="org-d") == "org-r"
    assert resolve_org() is None
    assert needs_customer_link(objects=(bare,))
    assert not needs_customer_link(objects=(bare,), payment_intent=a)
    assert not needs_customer_link(subscription_org="org-c")


def test_events_of_the_other_mode_than_the_key():
    assert ev.key_is_live("sk_live_x") and ev.key_is_live("rk_live_x")
    assert ev.key_is_live("sk_test_x") is False and ev.key_is_live("") is None
    assert ev.other_mode(True, "sk_test_x") and ev.other_mode(False, "rk_live_x")
    assert not ev.other_mode(False, "sk_test_x") and not ev.other_mode(True, "sk_live_x")
    # No livemode (or not a boolean), or no key: the usual path.
    assert not ev.other_mode(None, "sk_live_x") and not ev.other_mode("true", "sk_test_x")
    assert not ev.other_mode(True, "")


@pytest.mark.parametrize("module", [orgs_module, ev])
def test_worked_examples_in_docstrings_hold(module):
    assert doctest.testmod(module).failed == 0


@pytest.fixture
def shop(config: BillingConfig) -> BillingConfig:
    """The example configuration with a second pack."""
    small = PackConfig(id="pack_50k", units=50000, price_cents=900, expiry_days=30,
                       stripe_price_id="price_pack_50k")
    return config.model_copy(update={"packs": [*config.packs, small]})


def item(price: str, quantity: int = 1, total: int = 4900) -> dict[str, object]:
    return {"id": f"li_{price}", "price": {"id": price}, "quantity": quantity,
            "amount_total": total}


def test_every_pack_line_is_credited_with_its_quantity_and_what_it_cost(shop):
    cart = resolve_purchase(shop, line_items=[
        item("price_pack_500k", 3, 14700), item("price_tshirt", 1, 2500),
        item("price_pack_50k", 2, 1800)])
    assert cart.verdict is Verdict.CREDIT
    assert [(line.pack.id, line.units, line.price_cents) for line in cart.lines] == [
        ("pack_500k", 1_500_000, 14700), ("pack_50k", 100_000, 1800)]
    bought = datetime(2026, 1, 1, tzinfo=UTC)
    assert cart.lines[1].expires_at(bought) == bought + timedelta(days=30)


def test_metadata_names_the_pack_of_a_payment_without_checkout_never_of_another_price(shop):
    meta = ({"metadata": {"pack_id": "pack_500k"}},)
    single = resolve_purchase(shop, line_items=[item("price_adhoc", 2, 9000)], metadata=meta)
    assert single.verdict is Verdict.UNRESOLVED  # which units that Price buys is not known
    second = resolve_purchase(shop, line_items=[item("price_pack_500k_eur", 1, 4500)])
    assert [(line.units, line.price_cents) for line in second.lines] == [(500_000, 4500)]
    bare = resolve_purchase(shop, line_items=None, metadata=meta, paid_cents=4500)
    assert [(line.units, line.price_cents) for line in bare.lines] == [(500_000, 4500)]
    two = resolve_purchase(shop, line_items=[item("price_a"), item("price_b")], metadata=meta)
    assert two.verdict is Verdict.UNRESOLVED
    unknown = resolve_purchase(shop, line_items=None, metadata=({"metadata": {"pack_id": "x"}},))
    assert unknown.verdict is Verdict.UNRESOLVED


def test_payments_that_bought_no_pack_are_ignored(shop):
    assert resolve_purchase(shop, line_items=[item("price_tshirt")]).verdict is Verdict.IGNORED
    named = resolve_purchase(shop, line_items=[item("price_tshirt")], names_org=True)
    assert named.verdict is Verdict.UNRESOLVED  # it names an organization: never silent
    assert resolve_purchase(shop, line_items=None).verdict is Verdict.IGNORED
    invoice = resolve_purchase(shop, line_items=None, invoice="in_1",
                               metadata=({"metadata": {"pack_id": "pack_500k"}},))
    assert invoice.verdict is Verdict.IGNORED
    zero = resolve_purchase(shop, line_items=[item("price_pack_500k", 0)])
    assert zero.verdict is Verdict.UNRESOLVED


def test_the_purchase_behind_a_refunded_charge(shop):
    def behind(**facts: object) -> Verdict:
        found = {"payment_intent": None, "session": None, "line_items": None, "intent": None,
                 "charge": None, **facts}
        return resolve_behind(shop, **found).verdict  # type: ignore[arg-type]

    assert behind() is Verdict.UNRESOLVED  # no payment intent: nothing to look up
    assert behind(charge={"metadata": {"pack_id": "pack_500k"}}) is Verdict.CREDIT
    assert behind(payment_intent="pi_1", intent={"metadata": {}}) is Verdict.IGNORED
    assert behind(payment_intent="pi_1", session={"id": "cs_1"},
                  line_items=[item("price_pack_50k")]) is Verdict.CREDIT
    assert behind(charge={"invoice": "in_1"}) is Verdict.IGNORED


def test_purchase_keys():
    assert purchase_key("pi_1", "cs_1") == "payment:pi_1"
    assert purchase_key(None, "cs_1") == "checkout:cs_1"
    assert [line_key("payment:pi_1", i) for i in range(3)] == [
        "payment:pi_1", "payment:pi_1:2", "payment:pi_1:3"]


def test_refunds_claw_back_when_pending_and_reverse_when_they_fail():
    assert refund_action({"id": "re_1", "amount": 100, "status": "pending"}) is RefundAction.CLAW
    assert refund_action({"id": "re_1", "amount": 100, "status": "succeeded"}) \
        is RefundAction.CLAW
    for status in ("failed", "canceled"):
        assert refund_action({"id": "re_1", "amount": 100, "status": status}) \
            is RefundAction.REVERSE
    assert refund_action({"id": "re_1", "amount": 0, "status": "succeeded"}) is RefundAction.NONE
    charge = resource("charge")
    assert charge_refunds(charge) == []
    charge["refunds"]["has_more"] = True
    assert charge_refunds(charge) is None
    del charge["refunds"]
    assert charge_refunds(charge) is None


def test_the_dispute_lifecycle():
    cases = {("created", "needs_response"): DisputeAction.OPEN,
             ("funds_withdrawn", "needs_response"): DisputeAction.WITHDRAW,
             ("closed", "lost"): DisputeAction.WITHDRAW,
             ("funds_reinstated", "won"): DisputeAction.REINSTATE,
             ("closed", "won"): DisputeAction.REINSTATE,
             ("closed", "warning_closed"): DisputeAction.NONE}
    for (kind, status), action in cases.items():
        assert dispute_action(f"charge.dispute.{kind}", {"status": status}) is action


def test_plan_from_prices_and_ended_statuses(config):
    sub = subscription(sub="sub_1", customer="cus_1", price="price_pro_yearly")
    assert plan_for_subscription(config, sub) == PlanChoice("pro", "active")
    unknown = subscription(sub="sub_1", customer="cus_1", price="price_gone")
    assert plan_for_subscription(config, unknown) == PlanChoice(None, "active", ("price_gone",))
    expired = subscription(sub="sub_1", customer="cus_1", price="price_pro_yearly",
                           status="incomplete_expired")
    assert plan_for_subscription(config, expired) == PlanChoice(None, "canceled")
    assert plan_for_subscription(config, sub, deleted=True) == PlanChoice(None, "canceled")


def test_several_plan_items_give_the_highest_quota_whatever_their_order(config):
    sub = subscription(sub="sub_1", customer="cus_1", price="price_starter_monthly")
    first = sub["items"]["data"][0]
    for prices in (["price_starter_monthly", "price_pro_monthly", "price_addon"],
                   ["price_addon", "price_pro_monthly", "price_starter_monthly"]):
        sub["items"]["data"] = [{**first, "id": f"si_{p}", "price": {**first["price"], "id": p}}
                                for p in prices]
        assert plan_for_subscription(config, sub) == PlanChoice("pro", "active"), prices


def test_a_per_seat_plan_counts_the_quantity_of_its_item(config):
    starter = 'stripe_price_ids = ["price_starter_monthly"]'
    seats = parse_config(EXAMPLE_CONFIG.read_text().replace(starter, starter + "\nper_seat = true"))
    sub = subscription(sub="sub_1", customer="cus_1", price="price_starter_monthly")
    sub["items"]["data"][0]["quantity"] = 5
    assert plan_for_subscription(seats, sub) == PlanChoice("starter", "active", seats=5)
    assert plan_quota(seats.plans_by_id["starter"], 5) == 250_000
    # 20 seats of starter (1,000,000) weigh more than one pro (500,000); 5 seats do not
    first = sub["items"]["data"][0]
    pro = {**first, "id": "si_pro", "quantity": 1, "price": {**first["price"],
                                                              "id": "price_pro_monthly"}}
    sub["items"]["data"] = [first, pro]
    assert plan_for_subscription(seats, sub).plan_id == "pro"
    first["quantity"] = 20
    assert plan_for_subscription(seats, sub) == PlanChoice("starter", "active", seats=20)
    assert plan_for_subscription(config, sub) == PlanChoice("pro", "active")  # no seat plans


def view(sub_id: str, status: str, plan: str | None, since: int = 0) -> SubscriptionView:
    return SubscriptionView(id=sub_id, status=status, plan_id=plan, since=since)


def test_the_highest_live_plan_wins_and_ending_one_subscription_keeps_the_other(config):
    upgrade = [view("sub_a", "active", "starter", 1), view("sub_b", "active", "pro", 2)]
    assert standing(config, upgrade, current_plan="starter").plan_id == "pro"
    leaving = [view("sub_a", "active", "starter", 3), view("sub_b", "active", "pro", 2)]
    assert standing(config, leaving, current_plan="pro").subscription_id == "sub_b"
    ended = [view("sub_a", "canceled", "starter", 4), view("sub_b", "past_due", "pro", 2)]
    found = standing(config, ended, current_plan="pro")
    assert (found.plan_id, found.status, found.subscription_id) == ("pro", "past_due", "sub_b")


def test_with_no_live_subscription_the_default_plan(config):
    assert standing(config, [], current_plan="pro").status == "none"
    gone = standing(config, [view("sub_a", "canceled", "pro")], current_plan="pro")
    assert (gone.plan_id, gone.status) == ("free", "canceled")
    pending = standing(config, [view("sub_a", "canceled", "pro", 1),
                                view("sub_b", "incomplete", None, 2)], current_plan="pro")
    assert (pending.plan_id, pending.status) == ("free", "incomplete")


def test_an_unknown_price_keeps_the_last_known_plan(config):
    add_on = [view("sub_a", "active", "pro", 1), view("sub_b", "active", None, 2)]
    assert standing(config, add_on, current_plan="pro").plan_id == "pro"
    alone = [view("sub_b", "active", None, 2)]
    assert standing(config, alone, current_plan="starter").plan_id == "starter"


def test_invoices_count_only_for_live_subscriptions():
    assert invoice_effect(True, "active").status == "past_due"
    assert invoice_effect(True, "past_due").status == "past_due"
    assert invoice_effect(True, "canceled").status is None
    assert invoice_effect(True, None).status is None
    recovered = invoice_effect(False, "past_due")
    assert (recovered.status, recovered.reread_plan) == ("active", True)
    assert invoice_effect(False, "active").status is None


def test_period_start_from_items_else_top_level():
    sub = subscription(sub="sub_1", customer="cus_1", price="p", period_start=1_780_000_000)
    assert period_start(sub) == datetime(2026, 5, 28, 20, 26, 40, tzinfo=UTC)
    assert period_start({"items": {"data": []}, "current_period_start": 86400}) == datetime(
        1970, 1, 2, tzinfo=UTC)
    assert period_start({}) is None


def test_invoice_subscription_new_and_old_shapes():
    new = resource("invoice")
    new["parent"]["subscription_details"]["subscription"] = "sub_new"
    assert invoice_subscription(new) == "sub_new"
    assert invoice_subscription({"parent": None, "subscription": "sub_old"}) == "sub_old"
    assert invoice_subscription({"subscription": {"id": "sub_exp"}}) == "sub_exp"
