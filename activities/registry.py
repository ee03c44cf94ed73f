"""Every activity the worker registers, built over one runtime (`worker.py` runs them; the
typed stubs workflows call, `workflows/steps.py`, are generated from this list)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from activities.admin import AdminActivities
from activities.auto_topup import AutoTopUpActivities
from activities.dunning import DunningActivities
from activities.ledger import LedgerActivities
from activities.reconcile import ReconcileActivities
from activities.reset import ResetActivities
from activities.stripe_api import StripeApiActivities
from activities.stripe_disputes import DisputeActivities
from activities.stripe_invoices import InvoiceActivities
from activities.stripe_purchases import PurchaseActivities
from activities.stripe_refunds import RefundActivities
from activities.webhooks import WebhookActivities
from billing.runtime import Runtime


def activities_for(runtime: Runtime) -> list[Callable[..., Any]]:
    ledger = LedgerActivities(runtime)
    admin = AdminActivities(runtime)
    reset = ResetActivities(runtime)
    stripe_api = StripeApiActivities(runtime.settings)
    purchases = PurchaseActivities(runtime, stripe_api)
    refunds = RefundActivities(runtime)
    disputes = DisputeActivities(runtime)
    invoices = InvoiceActivities(runtime, stripe_api)
    dunning = DunningActivities(runtime)
    reconcile = ReconcileActivities(runtime, stripe_api)
    auto_topup = AutoTopUpActivities(runtime, stripe_api)
    webhooks = WebhookActivities(runtime)
    return [
        ledger.expire_org_page,
        ledger.expire_org_lots,
        admin.admin_requires_approval,
        admin.admin_post_adjustment,
        reset.weekly_reset_page,
        reset.weekly_reset_org,
        stripe_api.retrieve_subscription,
        stripe_api.retrieve_charge,
        stripe_api.retrieve_event,
        stripe_api.list_refunds,
        stripe_api.read_purchase_facts,
        purchases.record_outcome,
        purchases.resolve_org,
        purchases.read_and_apply_purchase,
        purchases.apply_purchase_failed,
        refunds.apply_refunds,
        disputes.apply_dispute,
        invoices.subscription_state,
        invoices.apply_subscription,
        invoices.apply_invoice,
        dunning.dunning_org_page,
        dunning.dunning_org,
        reconcile.org_page,
        reconcile.subscription,
        reconcile.missed_events,
        reconcile.write_report,
        auto_topup.charge,
        auto_topup.record,
        webhooks.deliver_webhook,
    ]
