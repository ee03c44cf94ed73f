"""The customer page (`GET /portal`, SPEC §5.10) in a real headless Chromium, the Debian
`chromium` package driven through Playwright: what it shows matches the API, an expired or
revoked link says so, it reads well 375 px wide, and nothing it loads leaves the engine's origin.

Screenshots go to `$PORTAL_SCREENSHOTS` when set, else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright
from portal_helpers import OPERATOR, bearer, customer_token, expired_token, registered
from stripe_fake import StripeFake
from stripe_payloads import event, metadata, new_id, payment_intent, refund, subscription
from temporalio.client import Client
from victims import recorded

from billing.runtime import Runtime
from starter.api.app import create_app
from starter.embedded import free_port

PACK = "pack_500k"
DAY_S = 86400


def chromium_path() -> str | None:
    """`$CHROMIUM`, else the Debian package's `chromium` on the PATH."""
    chosen = os.environ.get("CHROMIUM")
    if chosen:
        return chosen if Path(chosen).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    if executable is None:
        reason = ("the customer page tests need Chromium: install the Debian `chromium` package "
                  "(apt-get install chromium; .ci/run does) or set CHROMIUM to its path")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable)
        yield launched
        await launched.close()


@pytest.fixture(scope="module")
async def server(portal_runtime: Runtime, temporal_client: Client) -> AsyncIterator[str]:
    """The app on a real port (the page and its API on one origin), in this event loop."""
    port = free_port()
    runtime = Runtime(settings=portal_runtime.settings.model_copy(
        update={"billing_public_url": f"http://127.0.0.1:{port}"}),
        config=portal_runtime.config, db=portal_runtime.db)
    http = uvicorn.Server(uvicorn.Config(create_app(runtime, temporal_client), host="127.0.0.1",
                                         port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(http.serve())
    while not http.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    http.should_exit = True
    await task


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    chosen = Path(os.environ.get("PORTAL_SCREENSHOTS") or tmp_path / "screenshots")
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


@dataclass(frozen=True)
class Customer:
    org: str
    customer: str
    #: Units of its active balance hold (0 on an engine without holds).
    held: int


@pytest.fixture(scope="module")
async def customer(portal_api: httpx.AsyncClient, api: httpx.AsyncClient, stripe_worker: Any,
                   temporal_client: Client, stripe_fake: StripeFake) -> Customer:
    """An organization on the starter plan (50000 units a week) with a pack bought 353 days
    ago (it expires in 12 days), one bought now and partly refunded, 56000 units used this
    week (6000 beyond the plan) and 1200 units on hold."""
    org = await registered(portal_api, new_id("org"))
    cus, pi_old, pi_new, ch_new = new_id("cus"), new_id("pi"), new_id("pi"), new_id("ch")
    stripe_fake.customer(cus)
    for evt in (
        event("customer.subscription.created",
              subscription(sub=new_id("sub"), customer=cus, price="price_starter_monthly",
                           meta=metadata(org))),
        event("payment_intent.succeeded", payment_intent(pi=pi_old, meta=metadata(org, PACK)),
              created=int(time.time()) - 353 * DAY_S),
        event("payment_intent.succeeded",
              payment_intent(pi=pi_new, meta=metadata(org, PACK), charge=ch_new)),
        event("refund.created", refund(charge=ch_new, pi=pi_new, amount=490)),
    ):
        assert (await recorded(api, temporal_client, evt)).outcome == "applied", evt["type"]
    for run in range(6):
        units = 10000 if run < 5 else 6000
        used = await portal_api.post("/v1/usage", headers=OPERATOR,
                                     json={"org_id": org, "run_id": f"run-{run}",
                                           "units": units})
        assert used.status_code == 200, used.text
    hold = await portal_api.post(f"/v1/orgs/{org}/holds", headers=OPERATOR,
                                 json={"hold_id": "run-7", "units": 1200, "ttl_seconds": 3600})
    assert hold.status_code in (201, 404), hold.text  # 404: an engine without holds (§5.11)
    return Customer(org=org, customer=cus, held=1200 if hold.status_code == 201 else 0)


async def read(api: httpx.AsyncClient, org: str, what: str) -> Any:
    response = await api.get(f"/v1/orgs/{org}/{what}", headers=OPERATOR)
    assert response.status_code == 200, response.text
    return response.json()


async def number(page: Page, selector: str) -> int:
    value = await page.locator(selector).first.get_attribute("data-value")
    assert value is not None and value != "", selector
    return int(value)


@contextlib.asynccontextmanager
async def opened(browser: Browser, url: str, *, width: int = 1100, height: int = 900
                 ) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page at `url` in a fresh context, and every URL it requested."""
    context = await browser.new_context(viewport={"width": width, "height": height},
                                        locale="en-US", timezone_id="UTC")
    page = await context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await page.goto(url)
        yield page, requested
        assert errors == []
    finally:
        await context.close()


async def test_the_page_shows_what_the_api_says(
    browser: Browser, server: str, portal_api: httpx.AsyncClient, customer: Customer,
    screenshots: Path,
) -> None:
    org = customer.org
    token = await customer_token(portal_api, org, "read", "purchase")
    url = f"{server}/portal#token={token['token']}"
    async with opened(browser, url) as (page, requested):
        await page.locator("#content").wait_for(state="visible")
        meter, balance, quota = [await read(portal_api, org, w)
                                 for w in ("meter", "balance", "quota")]
        assert (meter["used"], meter["quota"], meter["plan_id"]) == (56000, 50000, "starter")
        assert await number(page, "#used") == meter["used"]
        assert await number(page, "#quota-line") == meter["quota"]
        assert await page.locator("#used").inner_text() == "56,000"
        assert await page.locator("#plan-badge").inner_text() == "Starter plan"
        bar = page.locator("#usage-bar")
        assert await bar.get_attribute("aria-valuenow") == "100"
        assert "over" in (await bar.get_attribute("class") or "")
        assert "resets in" in await page.locator("#reset-line").inner_text()

        assert await number(page, "#balance") == balance["balance"]
        assert await number(page, "#remaining") == quota["remaining"]
        assert await number(page, "#held") == meter.get("held", 0) == customer.held

        # Every lot, soonest expiry first, with what is left and when it expires in words.
        lots = page.locator("#lots li")
        shown = [(await lots.nth(i).get_attribute("data-lot-id"),
                  int(await lots.nth(i).locator(".lot-remaining").get_attribute("data-value")
                      or -1))
                 for i in range(await lots.count())]
        by_expiry = sorted(balance["lots"], key=lambda lot: (lot["expires_at"] is None,
                                                             lot["expires_at"] or ""))
        assert shown == [(lot["id"], lot["remaining"]) for lot in by_expiry]
        assert len(shown) == 3  # the old pack, the new one, the signup grant
        first = await lots.nth(0).inner_text()
        assert "Purchased pack" in first and "Expires in 12 days" in first
        assert "494,000 of 500,000 units left" in first  # the 6000 beyond the plan came from it
        assert "Never expires" in await lots.nth(2).inner_text()

        activity = await page.locator("#activity").inner_text()
        for line in ("Used 6,000 units beyond the plan", "Refund: 50,000 units taken back",
                     "Bought 500,000 units", "Received 500 free units"):
            assert line in activity

        buy = page.locator("#packs-list form")
        assert await buy.count() == 1
        assert await buy.first.get_attribute("data-pack-id") == PACK
        assert await page.get_by_label("Quantity").input_value() == "1"
        assert await page.locator("#manage").is_visible()  # a Stripe customer is linked
        await page.screenshot(path=str(screenshots / "portal-desktop.png"), full_page=True)

        # Nothing left the engine's origin, and the token was never in a requested URL.
        assert requested and all(u.startswith(f"{server}/") for u in requested), requested
        assert not [u for u in requested if u.endswith("/favicon.ico")]
        assert not [u for u in requested if token["token"] in u]


async def test_buy_goes_to_the_checkout_page_and_manage_to_the_billing_portal(
    browser: Browser, server: str, portal_api: httpx.AsyncClient, customer: Customer,
    stripe_fake: StripeFake,
) -> None:
    token = await customer_token(portal_api, customer.org, "read", "purchase")
    async with opened(browser, f"{server}/portal#token={token['token']}") as (page, _):
        await page.locator("#content").wait_for(state="visible")
        await page.get_by_label("Quantity").fill("2")
        await page.get_by_role("button", name="Buy 500,000 units").click()
        await page.wait_for_url(f"{stripe_fake.url}/c/pay/*")
        session_id = page.url.rsplit("/", 1)[1]
        session = stripe_fake.objects[session_id]
        assert (session["metadata"]["org_id"], session["metadata"]["pack_id"]) == (
            customer.org, PACK)
        assert session["customer"] == customer.customer
        assert [(line["price"]["id"], line["quantity"])
                for line in stripe_fake.line_items[session_id]] == [("price_pack_500k", 2)]
        assert "Pay (test)" in await page.content()  # the fake's hosted Checkout page

        await page.goto(f"{server}/portal#token={token['token']}")
        await page.locator("#content").wait_for(state="visible")
        await page.get_by_role("button", name="Manage subscription").click()
        await page.wait_for_url(f"{stripe_fake.url}/p/session/*")
        [portal] = [p for p in stripe_fake.created["billing_portal.session"]
                    if p["url"] == page.url]
        assert portal["customer"] == customer.customer


async def test_a_read_only_link_shows_no_buying(
    browser: Browser, server: str, portal_api: httpx.AsyncClient, customer: Customer,
) -> None:
    token = await customer_token(portal_api, customer.org, "read")
    async with opened(browser, f"{server}/portal#token={token['token']}") as (page, _):
        await page.locator("#content").wait_for(state="visible")
        assert await page.locator("#buy").is_hidden()
        assert await number(page, "#used") == 56000


async def test_an_expired_or_revoked_link_says_so(
    browser: Browser, server: str, portal_api: httpx.AsyncClient, portal_runtime: Runtime,
    customer: Customer, screenshots: Path,
) -> None:
    expired = await expired_token(portal_runtime, customer.org)
    async with opened(browser, f"{server}/portal#token={expired}") as (page, _):
        notice = page.locator("#notice")
        await notice.wait_for(state="visible")
        assert "This link has expired" in await notice.inner_text()
        assert await page.locator("#content").is_hidden()
        await page.screenshot(path=str(screenshots / "portal-expired.png"))

    revoked = await customer_token(portal_api, customer.org)
    assert (await portal_api.delete(f"/v1/tokens/{revoked['token_id']}",
                                    headers=OPERATOR)).status_code == 204
    async with opened(browser, f"{server}/portal#token={revoked['token']}") as (page, _):
        notice = page.locator("#notice")
        await notice.wait_for(state="visible")
        assert "This link was revoked" in await notice.inner_text()

    async with opened(browser, f"{server}/portal") as (page, _):
        await page.locator("#notice").wait_for(state="visible")
        assert "No access link" in await page.locator("#notice").inner_text()


async def test_the_page_reads_well_375_px_wide(
    browser: Browser, server: str, portal_api: httpx.AsyncClient, customer: Customer,
    screenshots: Path,
) -> None:
    token = await customer_token(portal_api, customer.org, "read", "purchase")
    async with opened(browser, f"{server}/portal#token={token['token']}", width=375,
                      height=812) as (page, _):
        await page.locator("#content").wait_for(state="visible")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        for selector in ("#used", "#balance", "#lots li", "#packs-list button"):
            box = await page.locator(selector).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
        size = await page.locator("#used").evaluate("e => getComputedStyle(e).fontSize")
        assert float(size.removesuffix("px")) >= 16
        await page.screenshot(path=str(screenshots / "portal-mobile.png"), full_page=True)


async def test_the_page_is_framed_only_by_the_configured_sites(
    portal_api: httpx.AsyncClient, portal_runtime: Runtime
) -> None:
    response = await portal_api.get("/portal")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors https://app.example.com" in policy
    assert portal_runtime.config.portal.frame_ancestors == ("https://app.example.com",)
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "http" not in policy.replace(
        "https://app.example.com", "")
    assert response.headers["referrer-policy"] == "no-referrer"
    assert '"id": "pack_500k"' in response.text
    for asset in ("/portal/portal.js", "/portal/portal.css"):
        served = await portal_api.get(asset)
        assert served.status_code == 200 and served.headers["x-content-type-options"] == "nosniff"
    # A customer token is not needed for the page itself, and the page carries no data.
    token = await customer_token(portal_api, await registered(portal_api, new_id("org")))
    assert token["token"] not in response.text
    assert (await portal_api.get("/portal", headers=bearer(token["token"]))).text == response.text


def test_the_chromium_lookup_honours_chromium(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "missing"))
    assert chromium_path() is None
    monkeypatch.setenv("CHROMIUM", str(Path(__file__)))
    assert chromium_path() == str(Path(__file__))
