"""Configuration: the TOML file (`billing.toml`) and the environment (SPEC §4).

The file describes the product (meter, plans, packs, policies); the environment describes where
things run and holds the secrets. Both are validated at start: an invalid file raises
`ConfigError` naming the bad key.
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.tokens import check_keys
from billing.webhooks import check_receivers

EXAMPLE_CONFIG = Path(__file__).with_name("billing.example.toml")

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MeterConfig(_Strict):
    dollars_to_units: int = Field(gt=0)
    run_base_units: int = Field(ge=0)
    max_units_per_operation: int = Field(gt=0)
    ratio_version: str = Field(min_length=1)
    alert_thresholds: tuple[int, ...] = (80, 100)
    runaway_factor: int = Field(default=10, gt=0)

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(t <= 0 or t > 1000 for t in value):
            raise ValueError("thresholds are percentages between 1 and 1000")
        return tuple(sorted(set(value)))


class PlanConfig(_Strict):
    id: Identifier
    meter_quota: int = Field(ge=0)
    signup_grant: int = Field(default=0, ge=0)
    stripe_price_ids: tuple[str, ...] = ()
    ratios: dict[str, Decimal] = Field(default_factory=dict)
    #: The weekly quota is `meter_quota` x the quantity of the subscription item (seats).
    per_seat: bool = False

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for key, ratio in value.items():
            if not ratio.is_finite() or ratio < 0:
                raise ValueError(f"ratio {key!r} must be a finite number >= 0")
        return value

    def ratio(self, cost_key: str) -> Decimal:
        """`ratios[key]`, else `ratios["default"]`, else 1 (SPEC §5.2)."""
        return self.ratios.get(cost_key, self.ratios.get("default", Decimal(1)))


class PackConfig(_Strict):
    """A credit pack. `stripe_price_ids` lists every Stripe Price that sells it (one per
    currency, older Prices still sold by open payment links); the single-price spelling
    `stripe_price_id = "..."` is accepted too. `currency` is that of `price_cents`, what an
    automatic top-up charges."""

    id: Identifier
    units: int = Field(gt=0)
    price_cents: int = Field(gt=0)
    expiry_days: int | None = Field(default=None, gt=0)
    stripe_price_ids: tuple[str, ...] = ()
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")

    @model_validator(mode="before")
    @classmethod
    def _single_price(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stripe_price_id" in data:
            if "stripe_price_ids" in data:
                raise ValueError("give stripe_price_ids or stripe_price_id, not both")
            data = dict(data)
            single = data.pop("stripe_price_id")
            data["stripe_price_ids"] = [single] if single else []
        return data


class SubscriptionsConfig(_Strict):
    default_plan: str
    grace_days: int = Field(ge=0)
    unpaid_after_days: int = Field(ge=0)


class ReconcileConfig(_Strict):
    tolerance_units: int = Field(ge=0)
    tolerance_ratio: Decimal = Field(ge=0)


class AdminConfig(_Strict):
    approval_threshold_units: int = Field(gt=0)


def _absolute_http(url: str) -> str:
    """An absolute http(s) URL with a host, as Stripe and browsers need it."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{url!r} is not an absolute http(s) URL")
    return url


HttpUrl = Annotated[str, AfterValidator(_absolute_http)]


class CheckoutConfig(_Strict):
    """Where Stripe Checkout sends the customer back (SPEC §5.9), unless a request says."""

    success_url: HttpUrl = "http://127.0.0.1:8000/portal?checkout=done"
    cancel_url: HttpUrl = "http://127.0.0.1:8000/portal"


class PortalConfig(_Strict):
    """The customer page (SPEC §5.10): which origins may embed it in a frame."""

    frame_ancestors: tuple[HttpUrl, ...] = ()


class BillingConfig(_Strict):
    """The product configuration of one deployment (the TOML file)."""

    meter: MeterConfig
    plans: tuple[PlanConfig, ...] = Field(min_length=1)
    packs: tuple[PackConfig, ...] = ()
    subscriptions: SubscriptionsConfig
    reconcile: ReconcileConfig
    admin: AdminConfig
    checkout: CheckoutConfig = CheckoutConfig()
    portal: PortalConfig = PortalConfig()

    @model_validator(mode="after")
    def _references(self) -> Self:
        plan_ids = [p.id for p in self.plans]
        if len(set(plan_ids)) != len(plan_ids):
            raise ValueError("plans: plan ids must be unique")
        if self.subscriptions.default_plan not in plan_ids:
            raise ValueError(
                f"subscriptions.default_plan: {self.subscriptions.default_plan!r} is not a plan id"
            )
        pack_ids = [p.id for p in self.packs]
        if len(set(pack_ids)) != len(pack_ids):
            raise ValueError("packs: pack ids must be unique")
        prices = [price for plan in self.plans for price in plan.stripe_price_ids]
        prices += [price for pack in self.packs for price in pack.stripe_price_ids]
        if len(set(prices)) != len(prices):
            raise ValueError("stripe_price_ids: a price id belongs to one plan or pack only")
        return self

    @cached_property
    def plans_by_id(self) -> dict[str, PlanConfig]:
        return {p.id: p for p in self.plans}

    @cached_property
    def packs_by_id(self) -> dict[str, PackConfig]:
        return {p.id: p for p in self.packs}

    @property
    def default_plan(self) -> PlanConfig:
        return self.plans_by_id[self.subscriptions.default_plan]

    def plan(self, plan_id: str | None) -> PlanConfig:
        """The plan with this id; an unknown or missing id falls back to the default plan."""
        return self.plans_by_id.get(plan_id or "", self.default_plan)

    def plan_for_price(self, price_id: str) -> PlanConfig | None:
        for plan in self.plans:
            if price_id in plan.stripe_price_ids:
                return plan
        return None

    def pack_for_price(self, price_id: str) -> PackConfig | None:
        for pack in self.packs:
            if price_id in pack.stripe_price_ids:
                return pack
        return None


def _error_location(error: ValidationError) -> str:
    parts = []
    for detail in error.errors():
        loc = ".".join(str(p) for p in detail["loc"])
        parts.append(f"{loc or '(top level)'}: {detail['msg']}")
    return "; ".join(parts)


def parse_config(text: str, source: str = "<string>") -> BillingConfig:
    """Parse and validate TOML text; raise `ConfigError` naming the bad key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return BillingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration: {_error_location(exc)}") from exc


def config_path(explicit: str | None = None) -> Path:
    """`BILLING_CONFIG`, else `./billing.toml`, else the shipped example."""
    chosen = explicit or os.environ.get("BILLING_CONFIG")
    if chosen:
        return Path(chosen)
    local = Path("billing.toml")
    return local if local.exists() else EXAMPLE_CONFIG


def load_config(path: str | Path | None = None) -> BillingConfig:
    target = Path(path) if path else config_path()
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read configuration: {exc.strerror}") from exc
    return parse_config(text, str(target))


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class Settings(BaseSettings):
    """Where things run and the secrets, from the environment only (SPEC §4)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    mongodb_uri: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    mongodb_db: str = "billing"
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "billing"
    stripe_webhook_secret: str = ""
    stripe_api_key: str = ""
    stripe_api_base: str | None = None
    billing_api_token: str = ""
    billing_config: str | None = None

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that give them, for a child process."""
        return {name.upper(): str(value) for name, value in self.model_dump().items()
                if value is not None}
    billing_webhook_url: str = ""
    billing_webhook_secret: str = ""
    #: How long a delivery keeps retrying before its workflow fails (SPEC §5.7: 3 days).
    billing_webhook_budget_seconds: int = Field(default=3 * 24 * 3600, gt=0)
    #: How often the worker looks for notifications whose deliveries are not started yet.
    billing_outbox_poll_seconds: float = Field(default=1.0, gt=0)
    billing_portal_secret: str = ""
    billing_public_url: str = "http://127.0.0.1:8000"

    @property
    def webhook_secrets(self) -> tuple[str, ...]:
        return _split_csv(self.stripe_webhook_secret)

    @property
    def webhook_receivers(self) -> tuple[str, ...]:
        """Where notifications are delivered (`BILLING_WEBHOOK_URL`); empty: nowhere."""
        return _split_csv(self.billing_webhook_url)

    @property
    def webhook_signing_secrets(self) -> tuple[str, ...]:
        """`BILLING_WEBHOOK_SECRET`, the current secret first."""
        return _split_csv(self.billing_webhook_secret)

    def check_webhooks(self) -> None:
        """Raise `ConfigError` when outbound webhooks are configured but cannot be signed."""
        try:
            check_receivers(self.webhook_receivers, self.webhook_signing_secrets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def api_tokens(self) -> tuple[str, ...]:
        return _split_csv(self.billing_api_token)

    @property
    def portal_secrets(self) -> tuple[str, ...]:
        """`BILLING_PORTAL_SECRET`: the keys of customer tokens, the signing one first."""
        return _split_csv(self.billing_portal_secret)

    def check_portal(self) -> None:
        """Raise `ConfigError` when a customer-token key is too short to sign with."""
        try:
            check_keys(self.portal_secrets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
