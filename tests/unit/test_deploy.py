"""The shipped monitoring configs speak of metrics the gateway really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway.batcher import BatchStats
from gateway.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported_names() -> set[str]:
    metrics = Metrics()
    with metrics.request("Embed") as outcome, metrics.in_flight():
        outcome.model = "m"
    metrics.batch_observer("m", "fp32")(BatchStats(2, 16, [0.001, 0.002], 0.01, failed=True))
    metrics.count_tokens("m", 3, 4)
    metrics.tokenization_seconds.labels("m").observe(0.001)
    metrics.track_queue_depth("m", "fp32", lambda: 0)
    metrics.set_model_info("m", "embedding", "fp32", "onnxruntime", "cpu", "CPUExecutionProvider")
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "polyglot-gateway.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b(pgw_[a-z_]+)", expr)}
    assert used
    assert used <= _exported_names(), used - _exported_names()
    assert {p["title"] for p in dashboard["panels"]} >= {"Queue depth", "Served models"}


def test_prometheus_scrapes_the_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["localhost:9464"]
