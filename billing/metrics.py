"""Prometheus metrics shared by the HTTP app and the activities.

Metric objects only (no I/O): they register on prometheus_client's default registry, which the
HTTP app exposes at `/metrics`. Define every new metric here so names stay in one place.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
