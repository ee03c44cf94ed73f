"""The Temporal SDK's own metrics (workers, polls, activity and workflow latencies).

The SDK's core serves them in Prometheus format on a loopback port of its own. A collector on
prometheus_client's default registry re-exports them, so the HTTP app's `/metrics` and the
worker's `--metrics-port` each give the engine's and the SDK's metrics in one scrape.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from starter.embedded import free_port
from starter.tracing import instrument_mongodb

SCRAPE_TIMEOUT_S = 2.0


class SdkMetrics(Collector):
    def __init__(self, url: str) -> None:
        self.url = url

    def collect(self) -> Iterator[Metric]:
        try:
            with urllib.request.urlopen(self.url, timeout=SCRAPE_TIMEOUT_S) as response:  # noqa: S310 - loopback URL we built
                text = response.read().decode("utf-8")
        except OSError:
            return
        yield from text_string_to_metric_families(text)


_enabled = False


def enable_sdk_metrics() -> None:
    """Make the default Temporal runtime export its metrics and add them to the registry.

    Call once per process, before the first Temporal client connects and the first MongoDB
    client is built: it also registers the MongoDB command tracer when tracing is configured."""
    global _enabled
    if _enabled:
        return
    instrument_mongodb()
    address = f"127.0.0.1:{free_port()}"
    Runtime.set_default(
        Runtime(telemetry=TelemetryConfig(
            metrics=PrometheusConfig(bind_address=address, durations_as_seconds=True)
        )),
        error_if_already_set=False,
    )
    REGISTRY.register(SdkMetrics(f"http://{address}/metrics"))
    _enabled = True


def serve_metrics(port: int) -> None:
    """Serve the registry on `port` (for `billing worker`, which has no HTTP app)."""
    start_http_server(port)
