"""docs/metrics/alerts.yml and prometheus.yml: complete rules, PINK metric
names that /metrics really serves, jobs that the scrape config defines, and
runbook sections that exist. With `promtool` on the PATH, Prometheus itself
checks the rules and runs a few scenarios through them; without it those
two tests are skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pink.metrics import ClusterCollector
from pink.redisconn import connect as redis_connect
from pink.store import Store

DOCS = Path(__file__).resolve().parents[2] / "docs"
ALERTS, CONFIG = DOCS / "metrics" / "alerts.yml", DOCS / "metrics" / "prometheus.yml"
RUNBOOK = DOCS / "operations.md"
SECTIONS = {"Upgrades", "Backups", "GPU servers", "Certificates", "etcd members"}
DURATION = re.compile(r"^(\d+[smhdw])+$")


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


def exported_names(config) -> set[str]:
    """Every sample name /metrics can serve: the collector yields each family
    at every scrape, samples or not, so an empty cluster names them all."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    store = Store.from_config(config)
    try:
        families = list(ClusterCollector(store, redis_connect(config)).collect())
    finally:
        store.close()
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


def test_every_alert_has_a_duration_severity_summary_and_description():
    assert len(alerts()) >= 10
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "two alerts share a name"
    for alert in alerts():
        name = alert["alert"]
        assert isinstance(alert.get("expr"), str) and alert["expr"].strip(), name
        assert DURATION.match(str(alert.get("for", ""))), f"{name}: `for:` missing or not a duration"
        assert alert.get("labels", {}).get("severity") in ("warning", "critical"), name
        annotations = alert.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert len(annotations.get("description", "").split()) >= 8, f"{name}: the description says too little"


def test_the_alerts_cover_what_operators_asked_for():
    text = " ".join(exprs())
    for needle in ("pink_leader", "pink_expected_runners", "pink_expected_gpus", "pink_queue_oldest_wait_seconds",
                   'pink_finalize_total{outcome="failed"}', "node_filesystem_avail_bytes",
                   "pink_node_spool_free_bytes", "probe_ssl_earliest_cert_expiry", "etcd_server_has_leader",
                   "etcd_server_leader_changes_seen_total", "etcd_mvcc_db_total_size_in_bytes",
                   "etcd_server_quota_backend_bytes", 'up{job="pink-web"} == 0'):
        assert needle in text, f"no alert uses {needle}"


def test_every_pink_metric_in_an_expression_is_one_pink_serves(pink_config):
    served = exported_names(pink_config)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert {name for name in recorded if name.startswith("pink_")} == {"pink_expected_runners", "pink_expected_gpus"}
    used = set()
    for expr in exprs():
        unquoted = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
        used |= set(re.findall(r"\bpink_[a-z0-9_]+", unquoted))
    assert used, "no PINK metric is used"
    unknown = used - served - recorded
    assert not unknown, f"not served by /metrics (pink/metrics.py): {sorted(unknown)}"


def test_the_scrape_config_loads_the_rules_and_defines_every_job_they_name():
    config = yaml.safe_load(CONFIG.read_text())
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    named = set()
    for expr in exprs():
        for value in re.findall(r'\bjob\s*=~?\s*"([^"]+)"', expr):
            named |= set(value.split("|"))
    assert named and named <= set(jobs), f"jobs the rules name but prometheus.yml lacks: {named - set(jobs)}"
    for job in ("etcd", "node", "redis", "mysqld", "dcgm", "pink-health", "pink-tls"):
        assert job in jobs, job


def test_each_web_node_is_scraped_directly_not_only_through_the_router():
    jobs = {job["job_name"]: job for job in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}

    def targets(job):
        return {t for static in jobs[job]["static_configs"] for t in static["targets"]}

    direct = targets("pink-web")
    assert len(direct) >= 2 and not direct & targets("pink")
    assert all(static.get("labels", {}).get("host") for static in jobs["pink-web"]["static_configs"])
    assert jobs["pink-web"]["authorization"]["credentials_file"]  # /metrics wants the metrics token
    # The router's job keeps the numbers; the per-node one only its `up`, so sums do not double.
    assert any(r.get("action") == "drop" and r.get("regex") == "pink_.*"
               for r in jobs["pink-web"]["metric_relabel_configs"])


def test_runbook_references_name_real_sections():
    cited, citation = set(), re.compile(r'docs/operations\.md,((?:\s*(?:and\s+)?"[^"]+")+)')
    for alert in alerts():
        for refs in citation.findall(alert["annotations"]["description"]):
            cited |= set(re.findall(r'"([^"]+)"', refs))
    assert cited == SECTIONS, f"cited {sorted(cited)}, expected {sorted(SECTIONS)}"
    if RUNBOOK.exists():  # written alongside; once there, every cited section must be a heading of it
        headings = {line.lstrip("#").strip() for line in RUNBOOK.read_text().splitlines() if line.startswith("#")}
        assert cited <= headings, f"docs/operations.md lacks sections {sorted(cited - headings)}"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


@needs_promtool
def test_promtool_accepts_the_rules():
    run = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def _series(name: str, values: str, **labels) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in {"job": "pink", "instance": "router", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _fires(at: str, alert: str, *labels: dict) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": dict(lab)} for lab in labels]}


@needs_promtool
def test_the_rules_fire_when_they_should_and_only_then(tmp_path):
    """promtool's unit tests, on a copy without annotations (promtool compares them whole)."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    critical, warning = {"severity": "critical"}, {"severity": "warning"}
    broken = [  # one runner with 2 GPUs (2 and 4 expected), no leader, web1 down, 1 of 3 etcd members
        _series("pink_queue_length", "0x30"),
        _series("pink_node_slots", "2x30", node="run1"),
        _series("pink_node_gpus", "1x30", node="run1", use="free"),
        _series("pink_node_gpus", "1x30", node="run1", use="used"),
        _series("pink_tasks_oldest_in_state_seconds", "3500+60x30", state="exported"),
        _series("up", "1 1 0x30", job="pink-web", instance="10.0.0.11:8443", host="web1"),
        _series("up", "1x30", job="etcd", instance="a"),
        _series("up", "0x30", job="etcd", instance="b"),
        _series("up", "0x30", job="etcd", instance="c"),
    ]
    healthy = [
        _series("pink_queue_length", "0x30"),
        _series("pink_leader", "1x30", holder="web1/web1/42"),
        *[_series("pink_node_slots", "2x30", node=n) for n in ("run1", "run2")],
        *[_series("pink_node_gpus", "1x30", node=n, use=u) for n in ("run1", "run2") for u in ("free", "used")],
        _series("pink_tasks_oldest_in_state_seconds", "60x30", state="exported"),
        _series("up", "1x30", job="pink-web", instance="10.0.0.11:8443", host="web1"),
        *[_series("up", "1x30", job="etcd", instance=i) for i in "abc"],
    ]
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": broken, "alert_rule_test": [
            _fires("20m", "PinkNoQueueLeader", critical),
            _fires("20m", "PinkRunnersMissing", warning),
            _fires("20m", "PinkGpusMissing", warning),
            _fires("20m", "PinkTasksStuckExported", warning),
            _fires("20m", "PinkWebNodeDown", {**critical, "job": "pink-web", "instance": "10.0.0.11:8443",
                                              "host": "web1"}),
            _fires("20m", "EtcdQuorumAtRisk", critical)]},
        {"interval": "1m", "input_series": healthy, "alert_rule_test": [
            _fires("20m", name) for name in ("PinkNoQueueLeader", "PinkRunnersMissing", "PinkGpusMissing",
                                             "PinkTasksStuckExported", "PinkWebNodeDown", "EtcdQuorumAtRisk")]},
        {"interval": "1m", "input_series": [_series("up", "0x30")], "alert_rule_test": [  # PINK unreachable
            _fires("20m", "PinkMetricsUnavailable", {**critical, "job": "pink", "instance": "router"}),
            _fires("20m", "PinkNoQueueLeader"), _fires("20m", "PinkRunnersMissing")]},
    ]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    run = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
