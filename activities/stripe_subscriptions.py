"""Subscriptions (SPEC §5.4): `customer.subscription.created|updated|deleted`,
`customer.deleted` and subscription-mode checkouts.

Each event changes the state of ONE Stripe subscription (ordered by that subscription's marker);
the organization's plan and status are then derived from all its subscriptions
(`billing.stripe.subscriptions.standing`).
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from temporalio import activity

from activities.stripe_api import StripeApiActivities
from activities.stripe_frame import Outcome, StripeFrame
from billing.clock import utcnow
from billing.models import StripeApply, StripeStep
from billing.runtime import Runtime
from billing.store.database import Doc
from billing.stripe.events import (
    CUSTOMER_DELETED,
    SUBSCRIPTION_FAMILY,
    Marker,
    is_stale,
    same_second,
)
from billing.stripe.objects import ref_id, timestamp
from billing.stripe.subscriptions import (
    CANCELED,
    DELINQUENT_STATUSES,
    ENDED_STATUSES,
    PlanChoice,
    is_live,
    period_start,
    plan_for_subscription,
    price_ids,
)

Obj = dict[str, Any]


class _SameSecond(Exception):
    """The event shares its second with the subscription's marker: read Stripe, then again."""


class SubscriptionActivities(StripeFrame):
    def __init__(self, runtime: Runtime, stripe_api: StripeApiActivities) -> None:
        super().__init__(runtime)
        self.stripe_api = stripe_api

    async def _standing(self, session: AsyncClientSession, outcome: Outcome,
                        link: dict[str, Any] | None = None) -> str:
        """Derive and write the organization's standing, move its plan; returns the status."""
        assert outcome.org_id is not None
        account = await self.runtime.db.accounts.find_one({"_id": outcome.org_id},
                                                          {"plan_id": 1}, session=session)
        found = await self.subscriptions.refresh_in(
            session, outcome.org_id, self.runtime.config,
            current_plan=(account or {}).get("plan_id"), now=outcome.apply.now, link=link)
        await self._meter_plan(session, outcome, found.plan_id, found.seats)
        return found.status

    async def _plan_unresolved(self, session: AsyncClientSession, outcome: Outcome,
                               choice: PlanChoice) -> None:
        await self._notify(
            session, outcome, "plan.unresolved", f"plan.unresolved:{outcome.apply.event.id}",
            {"prices": list(choice.unknown_prices), "status": choice.status},
        )

    async def save_subscription_in(self, session: AsyncClientSession, outcome: Outcome,
                                   sub: Obj, previous: Doc | None, *, deleted: bool = False,
                                   marker: Marker | None = None) -> PlanChoice:
        """Write one subscription's status, plan and period from a Stripe subscription object
        (raising `plan.unresolved` for a live one whose prices are no plan's)."""
        assert outcome.org_id is not None
        choice = plan_for_subscription(self.runtime.config, sub, deleted=deleted)
        previous = previous or {}
        fields: Obj = {"status": choice.status, "customer": ref_id(sub.get("customer")),
                       "prices": price_ids(sub), "current_period_start": period_start(sub)}
        if choice.plan_id is not None:
            fields.update(plan_id=choice.plan_id, seats=choice.seats)
        if choice.status == "past_due":
            fields["past_due_since"] = (previous.get("past_due_since")
                                        or timestamp(outcome.apply.event.created))
        elif choice.status not in DELINQUENT_STATUSES:
            fields["past_due_since"] = None
        await self.subscriptions.save_in(
            session, str(sub["id"]), outcome.org_id, fields=fields, now=outcome.apply.now,
            family=SUBSCRIPTION_FAMILY if marker else None, marker=marker)
        outcome.written.append(f"subscription {sub['id']} {choice.status}")
        if choice.plan_id is None and is_live(choice.status):
            await self._plan_unresolved(session, outcome, choice)
        if choice.status == CANCELED and previous.get("status") not in ENDED_STATUSES:
            await self._notify(session, outcome, "subscription.expired",
                               f"subscription.expired:{sub['id']}",
                               {"subscription": sub["id"], "event": outcome.apply.event.type})
        return choice

    @activity.defn(name="apply_stripe_subscription")
    async def apply_subscription(self, apply: StripeApply) -> StripeStep:
        """One subscription created, updated, ended, or bought through Checkout.

        An event of the same second as the subscription's marker (`same_second`) cannot be
        ordered: the subscription is read from Stripe and applied as Stripe holds it, and the
        marker keeps the greater of the two."""
        event = apply.event
        if event.type == CUSTOMER_DELETED:
            return await self._customer_deleted(apply)
        deleted = event.type == "customer.subscription.deleted"
        sub: Obj = apply.subscription or event.object
        sub_id = ref_id(sub.get("id"))
        customer = ref_id(sub.get("customer")) or ref_id(event.object.get("customer"))
        marker = Marker(event.created, event.id)
        from_stripe = apply.subscription is not None

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if sub_id is None:
                return outcome.set("unresolved", "the event names no subscription")
            previous = await self.subscriptions.subscription(sub_id, session)
            if not await self._resolve_org(session, outcome, customer, objects=(sub,),
                                           subscription_org=(previous or {}).get("org_id")):
                return None
            current = self.subscriptions.marker(previous, SUBSCRIPTION_FAMILY)
            tie = same_second(current, marker)
            if tie and not from_stripe:
                raise _SameSecond
            if is_stale(current, marker) and not tie:
                return outcome.set("stale", f"older than subscription {sub_id}'s marker {current}")
            org_id = outcome.org_id
            assert org_id is not None
            await self.runtime.accounts.ensure_in(session, org_id, apply.now)
            await self.save_subscription_in(
                session, outcome, {**sub, "id": sub_id}, previous,
                deleted=deleted, marker=max(marker, current) if tie and current else marker)
            status = await self._standing(session, outcome, {"stripe_customer_id": customer})
            if deleted and not is_live(status):
                await self.meters.reset_week_usage_in(session, org_id, utcnow())
                outcome.written.append("week usage reset")
            return None

        try:
            return await self._run(apply, work)
        except _SameSecond:
            assert sub_id is not None
            sub = await self.stripe_api.retrieve_subscription(sub_id)
            from_stripe = True
            return await self._run(apply, work)

    async def _customer_deleted(self, apply: StripeApply) -> StripeStep:
        """The customer is gone: every subscription of it ends, and the Stripe ids unlink, for
        every organization it pays for (one customer may pay for several)."""
        event = apply.event
        customer = ref_id(event.object.get("id"))
        marker = Marker(event.created, event.id)

        async def work(session: AsyncClientSession, outcome: Outcome) -> None:
            if not await self._resolve_org(session, outcome, customer):
                return None
            first = outcome.org_id
            linked = await self.subscriptions.orgs_for_customer(customer, session)
            for org_id in dict.fromkeys([first, *linked]):
                outcome.org_id = org_id
                await self._end_customer_in(session, outcome, customer, marker)
            outcome.org_id = first
            outcome.written.append(f"customer {customer} unlinked")
            return None

        return await self._run(apply, work)

    async def _end_customer_in(self, session: AsyncClientSession, outcome: Outcome,
                               customer: str | None, marker: Marker) -> None:
        """End one organization's subscriptions of a deleted customer and unlink it."""
        apply = outcome.apply
        org_id = outcome.org_id
        assert org_id is not None
        await self.runtime.accounts.ensure_in(session, org_id, apply.now)
        for doc in await self.subscriptions.of_org(org_id, session):
            if doc.get("customer") not in (None, customer):
                continue
            if is_stale(self.subscriptions.marker(doc, SUBSCRIPTION_FAMILY), marker):
                continue
            await self.subscriptions.save_in(
                session, doc["_id"], org_id, fields={"status": CANCELED,
                                                     "past_due_since": None},
                now=apply.now, family=SUBSCRIPTION_FAMILY, marker=marker)
            if doc.get("status") not in ENDED_STATUSES:
                await self._notify(session, outcome, "subscription.expired",
                                   f"subscription.expired:{doc['_id']}",
                                   {"subscription": doc["_id"], "event": apply.event.type})
        await self._standing(session, outcome, {"stripe_customer_id": None,
                                                "stripe_subscription_id": None})
