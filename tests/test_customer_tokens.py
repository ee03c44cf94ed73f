"""Customer tokens (SPEC §5.10): issued by the operator, signed with a rotating key, revocable at
once in every API process, and held to their own organization's reads (and, with `purchase`,
Checkout and the billing portal)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import jwt
import pytest
from cli_helpers import billing
from faults import serving, worker_env
from http_helpers import error_of
from portal_helpers import (
    CURRENT_KEY,
    OPERATOR,
    PORTAL_SECRET,
    PREVIOUS_KEY,
    PUBLIC_URL,
    RETIRED_KEY,
    bearer,
    customer_token,
    expired_token,
    registered,
)
from stripe_fake import StripeFake
from temporalio.client import Client

from billing.clock import utcnow
from billing.runtime import Runtime
from billing.tokens import (
    CustomerToken,
    Forbidden,
    TokenInvalid,
    authorize,
    issue,
    key_id,
    verify,
)

KEYS = (CURRENT_KEY, PREVIOUS_KEY)
READS = ["balance", "meter", "quota", "ledger", "notifications", "subscription"]


def b64(part: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")


def claims_of(token: str) -> dict[str, object]:
    payload: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return payload


# ---- the token rules ---------------------------------------------------------------------------


def test_a_token_names_its_key_and_verifies_after_a_rotation() -> None:
    now = utcnow()
    issued = issue(KEYS, "acme", frozenset({"read", "purchase"}), ttl_seconds=600, now=now)
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": "HS256", "typ": "JWT", "kid": key_id(CURRENT_KEY)}
    assert CURRENT_KEY not in issued.token and key_id(CURRENT_KEY) != key_id(PREVIOUS_KEY)
    claims = claims_of(issued.token)
    assert (claims["sub"], claims["scope"], claims["jti"]) == (
        "acme", "purchase read", issued.claims.token_id)
    assert claims["exp"] == int(now.timestamp()) + 600
    assert verify(KEYS, issued.token) == issued.claims

    # Another process whose clock is behind the issuer's accepts it too.
    ahead = issue(KEYS, "acme", frozenset({"read"}), ttl_seconds=600,
                  now=now + timedelta(seconds=30))
    assert verify(KEYS, ahead.token).org_id == "acme"

    # After a rotation the old key is second in the list: its tokens still verify.
    rotated = ("portal-key-newest-0a1b2c3d4e5f60718293", *KEYS)
    assert verify(rotated, issued.token).org_id == "acme"
    # Once it leaves the list, they do not.
    with pytest.raises(TokenInvalid, match="key"):
        verify((PREVIOUS_KEY,), issued.token)


@pytest.mark.parametrize("case", ["retired key", "alg none", "expired", "tampered", "garbage",
                                  "no kid", "no jti", "unknown scope"])
def test_tokens_that_do_not_verify(case: str) -> None:
    now = utcnow()
    good = issue(KEYS, "acme", frozenset({"read"}), ttl_seconds=600, now=now).token
    payload = {"sub": "acme", "scope": "read", "jti": "ctk_x", "exp": int(now.timestamp()) + 600}
    makers: dict[str, Callable[[], str]] = {
        "retired key": lambda: issue((RETIRED_KEY,), "acme", frozenset({"read"}),
                                     ttl_seconds=600, now=now).token,
        "alg none": lambda: f"{b64({'alg': 'none', 'kid': key_id(CURRENT_KEY)})}."
                            f"{b64(payload)}.",
        "expired": lambda: issue(KEYS, "acme", frozenset({"read"}), ttl_seconds=60,
                                 now=now - timedelta(seconds=61)).token,
        "tampered": lambda: good.split(".")[0] + "." + b64({**payload, "sub": "other"}) + "."
                            + good.split(".")[2],
        "garbage": lambda: "not.a.jwt",
        "no kid": lambda: jwt.encode(payload, CURRENT_KEY, algorithm="HS256"),
        "no jti": lambda: jwt.encode({k: v for k, v in payload.items() if k != "jti"},
                                     CURRENT_KEY, algorithm="HS256",
                                     headers={"kid": key_id(CURRENT_KEY)}),
        "unknown scope": lambda: jwt.encode({**payload, "scope": "read admin"}, CURRENT_KEY,
                                            algorithm="HS256",
                                            headers={"kid": key_id(CURRENT_KEY)}),
    }
    with pytest.raises(TokenInvalid):
        verify(KEYS, makers[case]())


def test_what_a_token_may_call() -> None:
    read = CustomerToken(token_id="ctk_r", org_id="acme", scopes=frozenset({"read"}),
                         expires_at=utcnow())
    buyer = CustomerToken(token_id="ctk_b", org_id="acme", scopes=frozenset({"read", "purchase"}),
                          expires_at=utcnow())
    for path in [*READS, "holds"]:
        authorize(read, "GET", f"/v1/orgs/{{org}}/{path}", "acme")
    for path in ("checkout", "billing-portal"):
        authorize(buyer, "POST", f"/v1/orgs/{{org}}/{path}", "acme")
        with pytest.raises(Forbidden, match="purchase"):
            authorize(read, "POST", f"/v1/orgs/{{org}}/{path}", "acme")
    with pytest.raises(Forbidden, match="own organization"):
        authorize(buyer, "GET", "/v1/orgs/{org}/balance", "globex")
    for method, route in [("PUT", "/v1/orgs/{org}"), ("POST", "/v1/usage"),
                          ("POST", "/v1/orgs/{org}/tokens"), ("DELETE", "/v1/tokens/{token_id}"),
                          ("GET", "/v1/orgs/{org}/auto-topup"), ("POST", "/v1/orgs/{org}/holds"),
                          ("GET", "/v1/stripe-events/{event_id}")]:
        with pytest.raises(Forbidden):
            authorize(buyer, method, route, "acme")


# ---- issuing ----------------------------------------------------------------------------------


async def test_issue_a_token_and_its_portal_url(portal_api: httpx.AsyncClient,
                                                portal_runtime: Runtime) -> None:
    org = await registered(portal_api, f"org-{uuid.uuid4().hex[:10]}")
    before = utcnow().replace(microsecond=0)
    answer = await customer_token(portal_api, org, "read", "purchase", ttl_seconds=120)
    assert set(answer) == {"token", "token_id", "expires_at", "portal_url"}
    assert answer["portal_url"] == f"{PUBLIC_URL}/portal#token={answer['token']}"
    claims = claims_of(answer["token"])
    assert (claims["sub"], claims["jti"], claims["scope"]) == (org, answer["token_id"],
                                                               "purchase read")
    assert before.timestamp() + 120 <= int(str(claims["exp"])) <= before.timestamp() + 121
    stored = await portal_runtime.db["customer_tokens"].find_one({"_id": answer["token_id"]})
    assert stored is not None and stored["org_id"] == org and stored["revoked_at"] is None
    default = await customer_token(portal_api, org)
    assert int(str(claims_of(default["token"])["exp"])) - utcnow().timestamp() > 3590


@pytest.mark.parametrize("body", [
    {"scopes": ["purchase"]}, {"scopes": []}, {"scopes": ["read", "admin"]},
    {"scopes": ["read", "read"]}, {"scopes": ["read"], "ttl_seconds": 59},
    {"scopes": ["read"], "ttl_seconds": 86401}, {"scopes": ["read"], "org": "other"},
])
async def test_refused_token_requests(portal_api: httpx.AsyncClient, victim_org: str,
                                      body: dict[str, object]) -> None:
    response = await portal_api.post(f"/v1/orgs/{victim_org}/tokens", json=body,
                                     headers=OPERATOR)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "VALIDATION_ERROR"


async def test_a_token_for_an_unknown_org_or_without_a_portal_secret(
    portal_api: httpx.AsyncClient, api: httpx.AsyncClient, victim_org: str
) -> None:
    unknown = await portal_api.post(f"/v1/orgs/org-{uuid.uuid4().hex[:10]}/tokens",
                                    json={"scopes": ["read"]}, headers=OPERATOR)
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "ORG_NOT_FOUND")
    # `api` is the engine without BILLING_PORTAL_SECRET.
    response = await api.post(f"/v1/orgs/{victim_org}/tokens", json={"scopes": ["read"]})
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "PORTAL_NOT_CONFIGURED" and "BILLING_PORTAL_SECRET" in error["message"]


@pytest.fixture
async def victim_org(portal_api: httpx.AsyncClient) -> str:
    return await registered(portal_api, f"org-{uuid.uuid4().hex[:10]}")


# ---- using one -------------------------------------------------------------------------------


async def test_a_read_token_reads_its_own_organization_only(
    portal_api: httpx.AsyncClient, victim_org: str
) -> None:
    other = await registered(portal_api, f"org-{uuid.uuid4().hex[:10]}")
    token = (await customer_token(portal_api, victim_org))["token"]
    for read in READS:
        own = await portal_api.get(f"/v1/orgs/{victim_org}/{read}", headers=bearer(token))
        assert own.status_code == 200, (read, own.text)
        assert own.json() == (await portal_api.get(f"/v1/orgs/{victim_org}/{read}",
                                                   headers=OPERATOR)).json()
        theirs = await portal_api.get(f"/v1/orgs/{other}/{read}", headers=bearer(token))
        assert (theirs.status_code, error_of(theirs)["code"]) == (403, "FORBIDDEN"), read

    refused = [
        ("PUT", f"/v1/orgs/{victim_org}", None),
        ("PUT", f"/v1/orgs/{other}", None),
        ("POST", "/v1/usage", {"org_id": victim_org, "run_id": "r1", "units": 5}),
        ("POST", "/v1/usage/batch", {"records": [{"org_id": victim_org, "run_id": "r2"}]}),
        ("POST", f"/v1/orgs/{victim_org}/tokens", {"scopes": ["read", "purchase"]}),
        ("DELETE", "/v1/tokens/ctk_somebody", None),
        ("GET", f"/v1/orgs/{victim_org}/auto-topup", None),
        ("PUT", f"/v1/orgs/{victim_org}/auto-topup",
         {"enabled": True, "pack_id": "pack_500k", "below_units": 1, "max_per_month": 1}),
        ("GET", "/v1/stripe-events/evt_x", None),
    ]
    for method, path, body in refused:
        response = await portal_api.request(method, path, json=body, headers=bearer(token))
        assert (response.status_code, error_of(response)["code"]) == (403, "FORBIDDEN"), path
    usage = await portal_api.get(f"/v1/orgs/{victim_org}/meter", headers=OPERATOR)
    assert usage.json()["used"] == 0  # nothing the token was refused was done


async def test_a_purchase_token_starts_checkout_and_the_billing_portal_of_its_org(
    portal_api: httpx.AsyncClient, stripe_fake: StripeFake, victim_org: str
) -> None:
    other = await registered(portal_api, f"org-{uuid.uuid4().hex[:10]}")
    reader = (await customer_token(portal_api, victim_org))["token"]
    buyer = (await customer_token(portal_api, victim_org, "read", "purchase"))["token"]
    pack = {"pack_id": "pack_500k", "quantity": 2}
    for token, org in ((reader, victim_org), (buyer, other)):
        for path, body in (("checkout", pack), ("billing-portal", {})):
            refused = await portal_api.post(f"/v1/orgs/{org}/{path}", json=body,
                                            headers=bearer(token))
            assert (refused.status_code, error_of(refused)["code"]) == (403, "FORBIDDEN")
    assert not [s for s in stripe_fake.created.get("checkout.session", [])
                if s["metadata"].get("org_id") in (victim_org, other)]

    started = await portal_api.post(f"/v1/orgs/{victim_org}/checkout", json=pack,
                                    headers=bearer(buyer))
    assert started.status_code == 200, started.text
    assert (started.json()["units"], started.json()["pack_id"]) == (1_000_000, "pack_500k")
    [session] = [s for s in stripe_fake.created["checkout.session"]
                 if s["url"] == started.json()["url"]]
    assert session["metadata"]["org_id"] == victim_org
    managed = await portal_api.post(f"/v1/orgs/{victim_org}/billing-portal", json={},
                                    headers=bearer(buyer))
    assert managed.status_code == 200, managed.text
    assert managed.json()["url"].startswith(stripe_fake.url)


async def test_a_purchase_token_sends_its_customer_back_to_the_apps_own_pages_only(
    portal_api: httpx.AsyncClient, stripe_fake: StripeFake, victim_org: str
) -> None:
    """A leaked link must not send a paying customer to a page of the holder's choice."""
    buyer = (await customer_token(portal_api, victim_org, "read", "purchase"))["token"]
    elsewhere = "https://phish.example.net/thanks"
    for path, body in (("checkout", {"pack_id": "pack_500k", "success_url": elsewhere}),
                       ("checkout", {"pack_id": "pack_500k", "cancel_url": elsewhere}),
                       ("billing-portal", {"return_url": elsewhere})):
        refused = await portal_api.post(f"/v1/orgs/{victim_org}/{path}", json=body,
                                        headers=bearer(buyer))
        assert (refused.status_code, error_of(refused)["code"]) == (403, "FORBIDDEN"), path
        assert "phish.example.net" in error_of(refused)["message"]
    own = "https://app.example.com/billing?bought=1"
    started = await portal_api.post(f"/v1/orgs/{victim_org}/checkout", headers=bearer(buyer),
                                    json={"pack_id": "pack_500k", "success_url": own})
    assert started.status_code == 200, started.text
    [session] = [s for s in stripe_fake.created["checkout.session"]
                 if s["url"] == started.json()["url"]]
    assert session["success_url"] == own
    # The operator's token may send a customer anywhere.
    operator = await portal_api.post(f"/v1/orgs/{victim_org}/checkout", headers=OPERATOR,
                                     json={"pack_id": "pack_500k", "success_url": elsewhere})
    assert operator.status_code == 200, operator.text


async def test_tokens_that_are_refused_with_401(
    portal_api: httpx.AsyncClient, portal_runtime: Runtime, victim_org: str
) -> None:
    now = utcnow()
    good = (await customer_token(portal_api, victim_org))["token"]
    retired = issue((RETIRED_KEY,), victim_org, frozenset({"read"}), ttl_seconds=600, now=now)
    await portal_runtime.tokens.record(retired.claims, now)  # only its key is wrong
    payload = claims_of(good)
    tokens = {
        "expired": await expired_token(portal_runtime, victim_org),
        "retired key": retired.token,
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': key_id(CURRENT_KEY)})}."
                    f"{b64(payload)}.",
        "alg none, no signature part": f"{b64({'alg': 'none'})}.{b64(payload)}.",
        "tampered org": ".".join([good.split(".")[0], b64({**payload, "sub": "someone"}),
                                  good.split(".")[2]]),
        "malformed": "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
        "never issued": jwt.encode({**payload, "jti": "ctk_forged"}, CURRENT_KEY,
                                   algorithm="HS256", headers={"kid": key_id(CURRENT_KEY)}),
    }
    for case, token in tokens.items():
        response = await portal_api.get(f"/v1/orgs/{victim_org}/balance", headers=bearer(token))
        assert response.status_code == 401, (case, response.text)
        assert error_of(response)["code"] == "TOKEN_INVALID", case
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await portal_api.get(f"/v1/orgs/{victim_org}/balance",
                                 headers=bearer(good))).status_code == 200
    # An operator token that is wrong is still the operator's error.
    wrong = await portal_api.get(f"/v1/orgs/{victim_org}/balance",
                                 headers=bearer("test-token-2"))
    assert (wrong.status_code, error_of(wrong)["code"]) == (401, "UNAUTHORIZED")


async def test_revoke_a_token(portal_api: httpx.AsyncClient, victim_org: str) -> None:
    answer = await customer_token(portal_api, victim_org)
    kept = await customer_token(portal_api, victim_org)
    path = f"/v1/orgs/{victim_org}/meter"
    assert (await portal_api.get(path, headers=bearer(answer["token"]))).status_code == 200
    for _ in range(2):  # revoking again changes nothing
        revoked = await portal_api.delete(f"/v1/tokens/{answer['token_id']}", headers=OPERATOR)
        assert revoked.status_code == 204, revoked.text
    refused = await portal_api.get(path, headers=bearer(answer["token"]))
    assert refused.status_code == 401
    assert error_of(refused) == {"code": "TOKEN_INVALID", "message": "customer token was revoked"}
    # A second tab's token of the same organization is not affected.
    assert (await portal_api.get(path, headers=bearer(kept["token"]))).status_code == 200
    unknown = await portal_api.delete("/v1/tokens/ctk_never_issued", headers=OPERATOR)
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "TOKEN_NOT_FOUND")
    bad = await portal_api.delete("/v1/tokens/$where", headers=OPERATOR)
    assert bad.status_code == 422


async def test_a_revocation_is_seen_at_once_by_another_api_process(
    portal_api: httpx.AsyncClient, portal_runtime: Runtime, temporal_client: Client,
    victim_org: str, tmp_path: Path,
) -> None:
    """`billing serve` in its own process checks the tokens that this process revokes."""
    env = {**worker_env(portal_runtime.settings, temporal_client),
           "BILLING_PORTAL_SECRET": PORTAL_SECRET}
    answer = await customer_token(portal_api, victim_org)
    async with serving(env, tmp_path / "serve.log") as other:
        path = f"/v1/orgs/{victim_org}/balance"
        seen = await other.get(path, headers=bearer(answer["token"]))
        assert seen.status_code == 200, seen.text
        assert seen.json()["org_id"] == victim_org
        await portal_api.delete(f"/v1/tokens/{answer['token_id']}", headers=OPERATOR)
        refused = await other.get(path, headers=bearer(answer["token"]))
        assert (refused.status_code, error_of(refused)["code"]) == (401, "TOKEN_INVALID")
        # The other way round: revoked there, refused here.
        second = await customer_token(portal_api, victim_org)
        assert (await portal_api.get(path, headers=bearer(second["token"]))).status_code == 200
        assert (await other.delete(f"/v1/tokens/{second['token_id']}")).status_code == 204
        assert (await portal_api.get(path, headers=bearer(second["token"]))).status_code == 401


# ---- the CLI ---------------------------------------------------------------------------------


async def test_billing_token_prints_a_portal_url(
    portal_runtime: Runtime, temporal_client: Client, victim_org: str
) -> None:
    env = {**worker_env(portal_runtime.settings, temporal_client),
           "BILLING_PORTAL_SECRET": PORTAL_SECRET, "BILLING_PUBLIC_URL": PUBLIC_URL}
    printed = await billing("token", victim_org, "--purchase", "--ttl", "300", env=env)
    assert printed.code == 0, printed.err
    url = printed.out.strip().splitlines()[0]
    assert url.startswith(f"{PUBLIC_URL}/portal#token=")
    claims = claims_of(url.split("#token=", 1)[1])
    assert (claims["sub"], claims["scope"]) == (victim_org, "purchase read")
    assert verify(KEYS, url.split("#token=", 1)[1]).org_id == victim_org

    as_json = await billing("token", victim_org, "--json", env=env)
    assert as_json.code == 0, as_json.err
    answer = json.loads(as_json.out)
    assert set(answer) == {"token", "token_id", "expires_at", "portal_url"}
    assert claims_of(answer["token"])["scope"] == "read"

    unset = await billing("token", victim_org, env={**env, "BILLING_PORTAL_SECRET": ""})
    assert unset.code == 1 and "BILLING_PORTAL_SECRET" in unset.err
    short = await billing("token", victim_org, env={**env, "BILLING_PORTAL_SECRET": "short"})
    assert short.code == 2 and "at least 32" in short.err


async def test_the_openapi_schema_documents_customer_tokens(portal_api: httpx.AsyncClient) -> None:
    schema = (await portal_api.get("/openapi.json")).json()
    parts = schema["components"]["schemas"]
    for model, fields in {"TokenRequest": {"scopes", "ttl_seconds"},
                          "IssuedTokenView": {"token", "token_id", "expires_at", "portal_url"}
                          }.items():
        properties = parts[model]["properties"]
        assert set(properties) == fields, model
        assert all(properties[f].get("description") for f in fields), model
    assert parts["TokenRequest"]["properties"]["ttl_seconds"]["maximum"] == 86400
    paths = schema["paths"]
    assert {"201", "404", "503"} <= set(paths["/v1/orgs/{org}/tokens"]["post"]["responses"])
    assert {"204", "404"} <= set(paths["/v1/tokens/{token_id}"]["delete"]["responses"])
    for path in ("/v1/orgs/{org}/balance", "/v1/orgs/{org}/meter", "/v1/usage",
                 "/v1/orgs/{org}/checkout"):
        operation = next(iter(paths[path].values()))
        assert "FORBIDDEN" in operation["responses"]["403"]["description"], path
    assert "/portal" in paths
