"""Prometheus metrics shared by the HTTP app and the activities.

Metric objects only (no I/O): they register on prometheus_client's default registry, which the
HTTP app exposes at `/metrics`. Define every new metric here so names stay in one place.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, Histogram

from billing.models import ReconcileCheck

HTTP_REQUESTS = Counter(
    "billing_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "billing_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
)

STRIPE_WEBHOOKS = Counter(
    "billing_stripe_webhooks_total",
    "Stripe webhook deliveries answered, by event type and answer "
    "(started, duplicate, ignored, rejected, unavailable).",
    ["type", "answer"],
)
STRIPE_OTHER_MODE = Counter(
    "billing_stripe_webhooks_other_mode_total",
    "Stripe events answered 200 ignored without a workflow because their livemode differs from "
    "the API key's mode (a test event on a live engine, or a live one on a test engine), by "
    "event type and the event's livemode.",
    ["type", "livemode"],
)
STRIPE_EVENTS = Counter(
    "billing_stripe_events_total",
    "Stripe events processed by the worker, by event type and outcome.",
    ["type", "outcome"],
)
LEDGER_ENTRIES = Counter(
    "billing_ledger_entries_total",
    "Ledger entries written (committed), by kind.",
    ["kind"],
)
USAGE_RECORD_SECONDS = Histogram(
    "billing_usage_record_seconds",
    "Time to record one usage record (POST /v1/usage), by whether it was applied or replayed.",
    ["applied"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
USAGE_BATCH_SECONDS = Histogram(
    "billing_usage_batch_seconds",
    "Time to record one batch of usage records (POST /v1/usage/batch).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
FAILED_WORKFLOWS = Gauge(
    "billing_failed_workflows",
    "Billing workflows whose last run failed (the dead letters), read from Temporal visibility "
    "at scrape time.",
)
RECONCILE_DIVERGENCES = Counter(
    "billing_reconcile_divergences_total",
    "Divergences found by reconciliation runs (each run counts what it finds, after reporting "
    "it), by check (ledger, meter, subscription).",
    ["check"],
)
# Every check's series exists from the start at 0, so `increase()` also sees the first one.
for _check in get_args(ReconcileCheck):
    RECONCILE_DIVERGENCES.labels(_check)
WEBHOOK_DELIVERIES = Counter(
    "billing_webhook_deliveries_total",
    "Outbound webhook delivery attempts, by outcome (delivered: 2xx; rejected: another status; "
    "unreachable: no answer).",
    ["outcome"],
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "billing_webhook_delivery_latency_seconds",
    "Time from a notification's creation to its receiver's 2xx, retries included.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
             86400.0, 259200.0),
)
WEBHOOK_OLDEST_UNDELIVERED_SECONDS = Gauge(
    "billing_webhook_oldest_undelivered_seconds",
    "Age of the oldest notification some receiver has not acknowledged yet (not started, "
    "retrying or failed); 0 when every one is delivered. Set by the worker's dispatcher.",
)
