"""The configuration file (SPEC §4): packs sold by several Prices, their currency, seat plans,
and what is refused at start with a message naming the key."""

from __future__ import annotations

import pytest

from billing.config import EXAMPLE_CONFIG, ConfigError, parse_config

EXAMPLE = EXAMPLE_CONFIG.read_text(encoding="utf-8")
PRICES = 'stripe_price_ids = ["price_pack_500k", "price_pack_500k_eur"]'


def test_a_pack_lists_every_price_that_sells_it_and_its_currency() -> None:
    config = parse_config(EXAMPLE)
    pack = config.packs_by_id["pack_500k"]
    assert pack.stripe_price_ids == ("price_pack_500k", "price_pack_500k_eur")
    assert pack.currency == "usd"
    assert config.pack_for_price("price_pack_500k_eur") is pack
    assert config.pack_for_price("price_pro_monthly") is None


def test_the_single_price_spelling_is_still_read() -> None:
    line = EXAMPLE.split(PRICES)[1].split("\n", 1)[0]
    config = parse_config(EXAMPLE.replace(PRICES + line, 'stripe_price_id = "price_old"'))
    assert config.packs_by_id["pack_500k"].stripe_price_ids == ("price_old",)


@pytest.mark.parametrize(("change", "message"), [
    ((PRICES, PRICES + '\nstripe_price_id = "price_x"'), "not both"),
    ((PRICES, 'stripe_price_ids = ["price_pro_monthly"]'), "one plan or pack only"),
    (('currency = "usd"', 'currency = "US dollars"'), "currency"),
])
def test_what_is_refused_names_the_key(change: tuple[str, str], message: str) -> None:
    assert change[0] in EXAMPLE
    with pytest.raises(ConfigError, match=message):
        parse_config(EXAMPLE.replace(*change))


def test_a_plan_may_count_seats() -> None:
    config = parse_config(EXAMPLE.replace("per_seat = false", "per_seat = true"))
    assert config.plans_by_id["pro"].per_seat
