"""/metrics: the cluster in Prometheus's format, for admins and metrics tokens only,
with counters the jobs keep and live state read at scrape time."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from pink.metrics import ClusterCollector
from pink.redisconn import connect as redis_connect
from pink.store import Store
from tests import images
from tests.helpers import Api, make_user


def _scrape(api: Api) -> dict[tuple[str, tuple], float]:
    r = api.http.get(api.url + "/metrics", verify=api.ca, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_are_for_admins_and_metrics_tokens(web):
    anonymous = Api(web, "")
    anonymous.http.headers.pop("Authorization")
    assert anonymous.http.get(anonymous.url + "/metrics", verify=anonymous.ca).status_code == 401
    user = Api(web, make_user(web, "uma"))
    assert user.http.get(user.url + "/metrics", verify=user.ca).status_code == 403
    admin = Api(web, make_user(web, "vic", admin=True))
    secret = admin("POST", "/tokens", json={"name": "prometheus", "scope": "metrics"}).json()["secret"]
    samples = _scrape(Api(web, secret))
    assert _value(samples, "pink_queue_length") == 0
    assert _value(samples, "pink_tasks", state="queued") == 0


def test_a_finished_task_is_counted(api, docker_client, tmp_path):
    admin = Api(api.config, make_user(api.config, "wes", admin=True))
    archive = images.fresh_archive(docker_client, "counted", tmp_path / "counted.tar", images.WRITER)
    task_id = api.submit(archive).json()["task"]["id"]  # a new image: it is copied to the runner
    assert api.wait(task_id)["state"] == "succeeded"
    deadline = time.monotonic() + 30
    while _value(samples := _scrape(admin), "pink_tasks_finished_total", state="succeeded") != 1:
        assert time.monotonic() < deadline, "the archived task was not counted"
        time.sleep(0.5)
    assert _value(samples, "pink_finalize_total", outcome="run") >= 1
    assert _value(samples, "pink_finalize_total", outcome="failed") is None
    assert _value(samples, "pink_transfer_bytes_total", direction="to_runner") > 0
    assert _value(samples, "pink_transfer_bytes_total", direction="from_runner") > 0
    assert _value(samples, "pink_submit_to_start_seconds_count") == 1
    assert _value(samples, "pink_submit_to_start_seconds_bucket", le="+Inf") == 1
    assert _value(samples, "pink_node_slots", node="run1") >= 1
    assert _value(samples, "pink_node_state", node="run1", state="ready") == 1
    assert [labels for (name, labels), v in samples.items() if name == "pink_leader" and v == 1]


def test_gpu_readings_a_runner_published_are_reported(pink_config):
    """Runners put NVML readings in their node record; /metrics reports them per GPU, with the model."""
    store = Store.from_config(pink_config)
    record = {"name": "gpu1", "gpus": ["GPU-a", "GPU-b"], "max_containers": 2,
              "gpu_inventory": [{"index": 0, "uuid": "GPU-a", "model": "NVIDIA H200", "memory": 150 * 2**30},
                                {"index": 1, "uuid": "GPU-b", "model": "NVIDIA H200", "memory": 150 * 2**30}],
              "gpu_stats": {"GPU-a": {"utilization": 0.97, "memory_used": 80 * 2**30, "memory_total": 150 * 2**30},
                            "GPU-b": {"utilization": 0.0, "memory_used": 0, "memory_total": 150 * 2**30}}}
    store.create(store.keys.node("gpu1"), record)
    store.create(store.keys.alloc("gpu1"), {"t1": {"gpus": ["GPU-a"]}})
    try:
        families = {f.name: f for f in ClusterCollector(store, redis_connect(pink_config)).collect()}
    finally:
        store.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert _value(samples, "pink_gpu_utilization_ratio", node="gpu1", gpu="GPU-a", model="NVIDIA H200") == 0.97
    assert _value(samples, "pink_gpu_memory_used_bytes", node="gpu1", gpu="GPU-a", model="NVIDIA H200") == 80 * 2**30
    assert _value(samples, "pink_node_gpus", node="gpu1", use="used") == 1
    assert _value(samples, "pink_node_gpus", node="gpu1", use="free") == 1
    assert _value(samples, "pink_node_tasks", node="gpu1") == 1
