"""`GET /metrics`: the cluster in Prometheus's text format (`pink.metrics`).

Readable by an admin (session or token) or a `metrics` token, the kind
`pink token create prometheus --scope metrics --no-expiry` makes for a
scraper; docs/metrics.md has a scrape config and a Grafana dashboard.
"""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pink.metrics import ClusterCollector
from pink.sweep_metrics import SweepCollector
from web.auth import require_metrics_reader
from web.resources import res

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    require_metrics_reader()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(res().store, res().redis))
    registry.register(SweepCollector(res().store, res().redis))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
