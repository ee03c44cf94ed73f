"""The rules of purchases the engine starts (SPEC §5.9), as plain data: milliseconds each."""

from __future__ import annotations

import doctest

import pytest

from billing import checkout
from billing.checkout import (
    AlreadySubscribed,
    CheckoutRequest,
    IdempotencyKeyReused,
    UnknownPack,
    UnknownPlan,
    checkout_id,
    checkout_named,
    pack_for_sale,
    plan_for_sale,
    same_request,
    session_params,
)
from billing.config import BillingConfig


def test_worked_examples_in_docstrings_hold() -> None:
    assert doctest.testmod(checkout, optionflags=doctest.ELLIPSIS).failed == 0


def test_a_key_names_one_record_per_organization() -> None:
    assert checkout_id("acme", "k") == checkout_id("acme", "k")
    assert len({checkout_id("acme", "k"), checkout_id("acme", "k2"),
                checkout_id("globex", "k")}) == 3
    assert checkout_id("acme", None) != checkout_id("acme", None)


def test_the_same_key_must_name_the_same_request() -> None:
    first = CheckoutRequest(org_id="acme", pack_id="pack_500k", quantity=2)
    same_request(first.to_doc(), first)
    with pytest.raises(IdempotencyKeyReused):
        same_request(first.to_doc(), CheckoutRequest(org_id="acme", pack_id="pack_500k"))


def test_what_may_be_sold(config: BillingConfig) -> None:
    assert pack_for_sale(config, "pack_500k").units == 500_000
    with pytest.raises(UnknownPack):
        pack_for_sale(config, "nope")
    with pytest.raises(UnknownPlan):
        plan_for_sale(config, "nope", current_plan="free", subscription_status=None)
    with pytest.raises(UnknownPlan, match="cannot be sold"):
        plan_for_sale(config, "free", current_plan="starter", subscription_status="canceled")
    with pytest.raises(AlreadySubscribed):
        plan_for_sale(config, "free", current_plan="free", subscription_status=None)
    with pytest.raises(AlreadySubscribed, match="billing portal"):
        plan_for_sale(config, "pro", current_plan="free", subscription_status="past_due")
    assert plan_for_sale(config, "pro", current_plan="starter",
                         subscription_status="canceled").id == "pro"


def test_the_session_carries_the_record_everywhere_the_purchase_goes(
        config: BillingConfig) -> None:
    pack = session_params(config, CheckoutRequest(org_id="acme", pack_id="pack_500k",
                                                  quantity=3), "co_1", "cus_1")
    meta = {"org_id": "acme", "pack_id": "pack_500k", "checkout_id": "co_1"}
    assert pack["mode"] == "payment" and pack["client_reference_id"] == "co_1"
    assert pack["metadata"] == meta == pack["payment_intent_data"]["metadata"]
    assert pack["line_items"] == [{"price": "price_pack_500k", "quantity": 3}]
    assert pack["success_url"] == config.checkout.success_url
    plan = session_params(config, CheckoutRequest(org_id="acme", plan_id="pro",
                                                  cancel_url="https://a.example/c"),
                          "co_2", "cus_1")
    assert plan["mode"] == "subscription" and "payment_intent_data" not in plan
    assert plan["subscription_data"]["metadata"]["plan_id"] == "pro"
    assert plan["line_items"] == [{"price": "price_pro_monthly", "quantity": 1}]
    assert plan["cancel_url"] == "https://a.example/c"


def test_the_record_an_object_names() -> None:
    record = "co_" + "a" * 24
    assert checkout_named({"client_reference_id": record}) == record
    assert checkout_named({"client_reference_id": "co_short", "metadata": {}}) is None
    assert checkout_named({"metadata": {"checkout_id": " co_x "}}) == "co_x"
    assert checkout_named(None, {"metadata": None}, {"client_reference_id": record}) == record
