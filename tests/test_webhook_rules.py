"""The pure rules of outbound webhooks (SPEC §5.7): ids, the body, Standard Webhooks headers
checked with the library's own verifier, and the configuration check."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from webhook_receiver import OLD_SECRET, SECRET

from billing.config import ConfigError, Settings
from billing.webhooks import (
    OutboundNotification,
    check_receivers,
    delivery_workflow_id,
    notification_body,
    receiver_hash,
    signed_headers,
)

NOTE = OutboundNotification(id="6650f0c2a1b2c3d4e5f60718", type="plan.changed", org_id="acme",
                            seq=7, created_at=datetime(2026, 5, 6, 12, 0, tzinfo=UTC),
                            payload={"from": "free", "to": "pro"})


def test_a_receiver_hash_is_short_stable_and_tells_urls_apart() -> None:
    url = "https://app.example.com/hooks/billing"
    assert receiver_hash(url) == receiver_hash(url)
    assert len(receiver_hash(url)) == 12 and int(receiver_hash(url), 16) >= 0
    assert receiver_hash(url) != receiver_hash(url + "2")
    # stable across releases: deliveries already started keep their ids
    assert receiver_hash("http://127.0.0.1:9000/hooks") == "f0061e822ee6"


def test_the_delivery_workflow_id_names_receiver_org_and_seq() -> None:
    url = "http://127.0.0.1:9000/hooks"
    assert delivery_workflow_id(url, "acme", 7) == f"deliver-{receiver_hash(url)}-acme-7"


def test_the_body_has_the_specified_fields_in_order() -> None:
    body = json.loads(notification_body(NOTE))
    assert list(body) == ["id", "type", "org_id", "seq", "created_at", "payload"]
    assert body == {"id": NOTE.id, "type": "plan.changed", "org_id": "acme", "seq": 7,
                    "created_at": "2026-05-06T12:00:00Z", "payload": {"from": "free", "to": "pro"}}


def test_headers_verify_with_the_standard_webhooks_library_for_every_secret() -> None:
    now = datetime.now(UTC)
    body = notification_body(NOTE)
    headers = signed_headers(NOTE.id, body, (SECRET, OLD_SECRET), now)
    assert headers["webhook-id"] == NOTE.id
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert all(sig.startswith("v1,") for sig in headers["webhook-signature"].split(" "))
    for secret in (SECRET, OLD_SECRET):
        assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace("pro", "free"), headers)


def test_only_the_current_secret_signs_when_there_is_one() -> None:
    headers = signed_headers(NOTE.id, "{}", (SECRET,), datetime.now(UTC))
    assert len(headers["webhook-signature"].split(" ")) == 1
    with pytest.raises(ValueError, match="no webhook signing secret"):
        signed_headers(NOTE.id, "{}", (), datetime.now(UTC))


@pytest.mark.parametrize(("urls", "secrets", "message"), [
    (("http://h/x",), (), "BILLING_WEBHOOK_SECRET is not"),
    (("ftp://h/x",), (SECRET,), "not an http"),
    (("h/x",), (SECRET,), "not an http"),
    (("http://h/x",), ("secret",), "does not start with whsec_"),
    (("http://h/x",), (SECRET, "whsec_!!!"), "secret 2 is not whsec_<base64>"),
    (("http://h/x",), ("whsec_",), "secret 1 is not whsec_<base64>"),
])
def test_a_receiver_that_cannot_be_signed_for_is_refused(
    urls: tuple[str, ...], secrets: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_receivers(urls, secrets)


def test_settings_read_several_receivers_and_secrets_and_default_to_no_delivery() -> None:
    Settings().check_webhooks()
    assert Settings().webhook_receivers == () and \
        Settings().billing_webhook_budget_seconds == 3 * 24 * 3600
    settings = Settings(billing_webhook_url="http://a/h, https://b/h",
                        billing_webhook_secret=f"{SECRET},{OLD_SECRET}")
    settings.check_webhooks()
    assert settings.webhook_receivers == ("http://a/h", "https://b/h")
    assert settings.webhook_signing_secrets == (SECRET, OLD_SECRET)
    with pytest.raises(ConfigError, match="BILLING_WEBHOOK_SECRET"):
        Settings(billing_webhook_url="http://a/h").check_webhooks()
