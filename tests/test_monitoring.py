"""The Grafana dashboard and the Prometheus alert rules in `deploy/` are well formed and only ask
for metrics the engine exports: those of `billing/metrics.py`, the Temporal SDK's metrics as the
engine re-exports them (`starter/telemetry.py`), and Prometheus's own `up`."""

from __future__ import annotations

import base64
import inspect
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from billing import metrics
from starter.cli import processes
from starter.telemetry import SdkMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "billing-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

#: Metrics of the Temporal SDK's core (its metrics reference), as the core serves them.
TEMPORAL_SDK_METRICS = {
    "counter": [
        "temporal_request", "temporal_request_failure", "temporal_long_request",
        "temporal_long_request_failure", "temporal_workflow_completed", "temporal_workflow_failed",
        "temporal_workflow_canceled", "temporal_workflow_continue_as_new",
        "temporal_workflow_task_execution_failed", "temporal_workflow_task_queue_poll_succeed",
        "temporal_activity_task_received", "temporal_activity_execution_failed",
        "temporal_activity_execution_cancelled", "temporal_local_activity_execution_failed",
        "temporal_sticky_cache_hit", "temporal_worker_start",
    ],
    "histogram": [
        "temporal_request_latency", "temporal_long_request_latency",
        "temporal_workflow_endtoend_latency", "temporal_workflow_task_execution_latency",
        "temporal_workflow_task_replay_latency", "temporal_workflow_task_schedule_to_start_latency",
        "temporal_activity_execution_latency", "temporal_activity_schedule_to_start_latency",
        "temporal_activity_succeed_endtoend_latency", "temporal_local_activity_execution_latency",
    ],
    "gauge": [
        "temporal_num_pollers", "temporal_sticky_cache_size",
        "temporal_worker_task_slots_available", "temporal_worker_task_slots_used",
    ],
}
#: The outbound webhook delivery metrics (SPEC §5.7), with their labels, until they are defined.
DELIVERY_METRICS = {
    "billing_webhook_deliveries_total": {"outcome"},
    "billing_webhook_delivery_latency_seconds_bucket": {"le"},
    "billing_webhook_delivery_latency_seconds_count": set(),
    "billing_webhook_delivery_latency_seconds_sum": set(),
    "billing_webhook_oldest_undelivered_seconds": set(),
}
TARGET_LABELS = {"job", "instance"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


@cache
def exported() -> dict[str, set[str]]:
    """Every sample name a scrape of the engine can hold, with its label names."""
    names: dict[str, set[str]] = {"up": set()}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                labels = set(metric._labelnames)
                for suffix in SUFFIXES[family.type]:
                    bucket = {"le"} if suffix == "_bucket" else set()
                    names[family.name + suffix] = labels | bucket
    for name, labels in DELIVERY_METRICS.items():
        names.setdefault(name, labels)
    names.update({name: {"*"} for name in sdk_names()})  # the SDK's labels vary by metric
    return names


def sdk_names() -> set[str]:
    """The SDK's metrics through the engine's re-export (`SdkMetrics`), which renames counters
    `<name>_total` as Prometheus's client does."""
    lines = []
    for kind, names in TEMPORAL_SDK_METRICS.items():
        for name in names:
            lines.append(f"# TYPE {name} {kind}")
            lines.extend([f'{name}_bucket{{le="+Inf"}} 1', f"{name}_sum 1", f"{name}_count 1"]
                         if kind == "histogram" else [f"{name} 1"])
    core_text = base64.b64encode("\n".join([*lines, ""]).encode()).decode()
    registry = CollectorRegistry()
    registry.register(SdkMetrics(f"data:text/plain;base64,{core_text}"))
    text = generate_latest(registry).decode()
    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.name.endswith("_created")}


def parse(expr: str) -> promql_parser.Expr:
    """Parse PromQL; Grafana's `$__rate_interval` stands for a duration."""
    return promql_parser.parse(expr.replace("$__rate_interval", "5m"))


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every series selector of a PromQL expression."""
    found = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {matcher.name for matcher in node.matchers.matchers}))

    promql_parser.walk(parse(expr), visit)
    return found


def grouping_labels(expr: str) -> set[str]:
    """The labels of every aggregation's `by (...)` or `without (...)`."""
    found: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.update(node.modifier.labels)

    promql_parser.walk(parse(expr), visit)
    return found


def check_expression(expr: str) -> None:
    found = selectors(expr)
    assert found, f"no metric in {expr!r}"
    known = exported()
    available = set(TARGET_LABELS)
    for name, labels in found:
        assert name in known, f"{name} is not exported by the engine ({expr!r})"
        if "*" not in known[name]:
            assert labels <= known[name] | TARGET_LABELS, f"{name} has no label {labels}"
        available |= known[name]
    if "*" not in available:
        assert grouping_labels(expr) <= available, expr


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if line.startswith("#")}


def test_the_expression_parser_finds_metrics_and_rejects_unknown_ones() -> None:
    assert selectors('histogram_quantile(0.95, sum by (le, route) (rate('
                     'billing_http_request_duration_seconds_bucket{route="/x"}[$__rate_interval]'
                     ')))') == [("billing_http_request_duration_seconds_bucket", {"route"})]
    assert selectors('up{job=~"billing-.*"} == 0') == [("up", {"job"})]
    assert "temporal_workflow_failed_total" in exported()
    assert "temporal_workflow_failed" not in exported()  # re-exported as a counter
    assert "billing_reconcile_divergences_total" in exported()
    with pytest.raises(AssertionError, match="not exported"):
        check_expression("rate(billing_made_up_total[5m])")
    with pytest.raises(AssertionError, match="has no label"):
        check_expression('billing_failed_workflows{org="acme"}')
    with pytest.raises(AssertionError):
        check_expression("sum by (org) (rate(billing_ledger_entries_total[5m]))")
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        check_expression("sum(rate(billing_ledger_entries_total[5m])")


def test_the_dashboard_is_valid_and_reads_only_exported_metrics() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    [variable] = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource", "datasource", "prometheus")
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            check_expression(target["expr"])
    used = {name for panel in graphs for target in panel["targets"]
            for name, _ in selectors(target["expr"])}
    # Every metric of billing/metrics.py is on the board.
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            assert any(name.startswith(metric._name) for name in used), metric._name


def test_the_alert_rules_are_valid_and_each_has_a_runbook() -> None:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    group_names = [group["name"] for group in data["groups"]]
    assert len(set(group_names)) == len(group_names)
    runbooks = anchors((ROOT / "RUNBOOKS.md").read_text(encoding="utf-8"))
    names = [rule["alert"] for rule in rules()]
    assert len(set(names)) == len(names)
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"Billing[A-Za-z]+", rule["alert"])
        assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        page, anchor = rule["annotations"]["runbook"].split("#")
        assert page == "RUNBOOKS.md" and anchor in runbooks, rule["alert"]
        check_expression(rule["expr"])
    alerted = {name for rule in rules() for name, _ in selectors(rule["expr"])}
    assert {"temporal_workflow_failed_total", "billing_webhook_oldest_undelivered_seconds",
            "billing_reconcile_divergences_total"} <= alerted


def test_prometheus_scrapes_the_api_and_the_workers_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert config["rule_files"] == [f"/etc/prometheus/{ALERTS.name}"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["billing-api"]["static_configs"] == [{"targets": ["api:8000"]}]
    [workers] = jobs["billing-worker"]["dns_sd_configs"]
    default_port = inspect.signature(processes.worker).parameters["metrics_port"].default
    assert (workers["names"], workers["port"]) == (["worker"], default_port)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["api"]["command"][-2:] == ["--port", "8000"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    assert any(volume.startswith(f"./{DASHBOARD.relative_to(ROOT)}:")
               for volume in services["grafana"]["volumes"])
