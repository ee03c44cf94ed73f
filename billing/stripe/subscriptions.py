"""Subscriptions (SPEC §5.4): the state of each Stripe subscription, and the organization's plan
and status derived from all of them.

An organization may hold several subscriptions at once (an upgrade creates the new one before the
old one ends; add-ons exist). Each keeps its own state; the organization's plan is the
highest-quota plan among its live subscriptions, so updating or ending one never moves the
organization off a plan another still pays for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from billing.metering import plan_quota
from billing.stripe.objects import Obj, ref_id, timestamp

if TYPE_CHECKING:
    from billing.config import BillingConfig

#: Subscriptions that pay for their plan (a past-due one still does, within the grace days).
LIVE_STATUSES = frozenset({"active", "trialing", "past_due"})
#: Subscriptions that are over for good.
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
#: Statuses an `invoice.payment_succeeded` / `invoice.paid` recovers from.
DELINQUENT_STATUSES = frozenset({"past_due", "unpaid"})
#: The organization's status when it never had a subscription.
STATUS_NONE = "none"
CANCELED = "canceled"


def subscription_items(sub: Obj) -> list[Obj]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def price_ids(sub: Obj) -> list[str]:
    return [p for p in (ref_id(item.get("price")) for item in subscription_items(sub)) if p]


def period_start(sub: Obj) -> datetime | None:
    """`items.data[0].current_period_start`, else the top-level field of older API versions."""
    items = subscription_items(sub)
    if items:
        found = timestamp(items[0].get("current_period_start"))
        if found is not None:
            return found
    return timestamp(sub.get("current_period_start"))


@dataclass(frozen=True)
class PlanChoice:
    """The plan a subscription pays for; `plan_id` None: none of its prices is a plan's (the
    subscription keeps the plan it last had), and `unknown_prices` says which prices."""

    plan_id: str | None
    status: str
    unknown_prices: tuple[str, ...] = ()
    #: The quantity of the item that gives the plan, when the plan is `per_seat` (else 1).
    seats: int = 1


def plan_for_subscription(config: BillingConfig, sub: Obj, *, deleted: bool = False) -> PlanChoice:
    """Plan and status of one subscription: an ended one is `canceled` and pays for nothing;
    otherwise, among the plans whose `stripe_price_ids` hold one of its items' prices, the one
    with the highest weekly quota (items `price_starter_monthly` and `price_pro_monthly` on one
    subscription: `pro`), whatever the order of the items. A `per_seat` plan's quota counts its
    item's `quantity`: 5 seats of a 50000-unit plan weigh 250000."""
    status = str(sub.get("status") or "incomplete")
    if deleted or status in ENDED_STATUSES:
        return PlanChoice(None, CANCELED)
    choices: list[PlanChoice] = []
    for item in subscription_items(sub):
        price = ref_id(item.get("price"))
        plan = config.plan_for_price(price) if price else None
        if plan is not None:
            quantity = item.get("quantity")
            seats = quantity if isinstance(quantity, int) and not isinstance(
                quantity, bool) and quantity > 0 and plan.per_seat else 1
            choices.append(PlanChoice(plan.id, status, seats=seats))
    if choices:
        return max(choices, key=lambda c: plan_quota(config.plans_by_id[str(c.plan_id)],
                                                     c.seats))
    return PlanChoice(None, status, tuple(price_ids(sub)))


@dataclass(frozen=True)
class SubscriptionView:
    """What the engine keeps of one Stripe subscription."""

    id: str
    status: str
    plan_id: str | None
    past_due_since: datetime | None = None
    period_start: datetime | None = None
    since: int = 0  # `created` of the newest subscription event applied (orders the ties)
    seats: int = 1


@dataclass(frozen=True)
class Standing:
    """The organization's plan and status, derived from all its subscriptions."""

    plan_id: str
    status: str
    subscription_id: str | None
    past_due_since: datetime | None
    period_start: datetime | None
    seats: int = 1


def standing(
    config: BillingConfig, subs: list[SubscriptionView], *, current_plan: str | None
) -> Standing:
    """The plan is the highest-quota plan among the live subscriptions and the status that of the
    subscription giving it (on a tie, one in good standing, then the newest). A live
    subscription whose price is no plan's keeps `current_plan` (the last known one). With none
    live: the default plan, and the status of the newest subscription that is not over
    (`incomplete`, `unpaid`, `paused`), else `canceled` (`none` without any subscription).
    """
    default = config.default_plan.id
    live = [s for s in subs if s.status in LIVE_STATUSES]
    if live:
        def rank(s: SubscriptionView) -> tuple[int, bool, int, str]:
            plan = config.plans_by_id.get(s.plan_id or current_plan or default)
            quota = plan_quota(plan, s.seats) if plan is not None else -1
            return (quota, s.status != "past_due", s.since, s.id)

        best = max(live, key=rank)
        plan_id = best.plan_id or current_plan or default
        if plan_id not in config.plans_by_id:
            plan_id = default
        return Standing(plan_id, best.status, best.id, best.past_due_since, best.period_start,
                        best.seats if best.plan_id == plan_id else 1)
    if not subs:
        return Standing(default, STATUS_NONE, None, None, None)
    pending = [s for s in subs if s.status not in ENDED_STATUSES]
    newest = max(pending or subs, key=lambda s: (s.since, s.id))
    status = newest.status if pending else CANCELED
    return Standing(default, status, newest.id, None, newest.period_start)


def is_live(status: str | None) -> bool:
    return status in LIVE_STATUSES
