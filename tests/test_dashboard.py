"""The Grafana dashboard (deploy/grafana/warmserve.json) asks only for metrics the services export,
with labels those metrics have, and imports into any Grafana (its data source is a variable)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.forecaster.metrics import ForecasterMetrics
from services.gateway.metrics import GatewayMetrics
from services.gpuagent.metrics import AgentMetrics
from services.placer.metrics import PlacerMetrics

DASHBOARD = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "warmserve.json").read_text())
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
BUILT_IN = {"le", "instance", "job"}  # histogram buckets; what Prometheus adds to every scraped series


def exported() -> dict[str, set[str]]:
    """Every series name the four services export -> its label names."""
    names: dict[str, set[str]] = {}
    for metrics in (GatewayMetrics(), PlacerMetrics(lambda: False), AgentMetrics("n"), ForecasterMetrics()):
        for name, collector in metrics.registry._names_to_collectors.items():
            names[name] = set(collector._labelnames)  # prometheus_client keeps no public accessor
    return names


def queries() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_every_metric_the_dashboard_names_is_exported_with_those_labels():
    names = exported()
    for expr in queries():
        used = re.findall(r"\b(warmserve_[a-z0-9_]+)(\{[^}]*\})?", expr)
        assert used, expr
        for name, selector in used:
            assert name in names, f"{name} is not exported ({expr})"
            labels = set(re.findall(r"(\w+)\s*=~?", selector))
            assert labels <= names[name] | BUILT_IN, f"{name}: {labels - names[name]}"
        for grouped in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            by = {label.strip() for label in grouped.split(",") if label.strip()}
            assert by <= set().union(*(names[n] for n, _ in used)) | BUILT_IN, expr


def test_it_shows_ttft_parts_hit_rate_placement_and_forecasts():
    text = " ".join(queries())
    for metric in ("warmserve_gateway_ttft_seconds", "warmserve_gateway_queue_wait_seconds",
                   "warmserve_gateway_instance_start_wait_seconds", "warmserve_gateway_engine_ttft_seconds",
                   "warmserve_agent_model_resident", "warmserve_forecaster_forecast", "warmserve_forecaster_actual",
                   "warmserve_placer_decisions_total"):
        assert metric in text
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} >= {"datasource", "model"}
    assert all(p.get("datasource", {}).get("uid") == "${datasource}" for p in DASHBOARD["panels"] if p["type"] != "row")
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_the_stand_in_picture_computes_quantiles_as_prometheus_does():
    from bench.dashboard import quantile

    def buckets(counts: dict[str, float]) -> dict:
        return {("h_bucket", frozenset({("le", le), ("model", "m")})): v for le, v in counts.items()}

    before = buckets({"0.1": 0, "1.0": 0, "+Inf": 0})
    after = buckets({"0.1": 50, "1.0": 100, "+Inf": 100})
    assert quantile(0.5, before, after, "h", model="m") == 0.1  # the 50th of 100 is the top of the first bucket
    assert abs(quantile(0.75, before, after, "h") - 0.55) < 1e-9  # halfway through (0.1, 1.0]
    assert quantile(0.5, before, before, "h") != quantile(0.5, before, before, "h")  # no requests: NaN
