"""Fixtures of the runner tests: a control plane with one runner, and a second on demand."""

from __future__ import annotations

import pytest

from tests.helpers import Api, make_user, wait_for


@pytest.fixture
def cluster_api(pink_processes, pink_config, cluster, config_variant):
    """Web, worker, leader and runner run1; `start_run2()` adds a second runner."""
    pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    pink_processes.runner()
    admin = Api(pink_config, make_user(pink_config, "admin", admin=True))

    def start_run2():
        cluster.start_sshd("run2")
        pink_processes.runner("run2", config_variant("run2", runner_name="run2", runner={"stop_grace": 1}))
        wait_for(lambda: len(admin("GET", "/nodes").json()["nodes"]) == 2)

    admin.start_run2 = start_run2
    wait_for(lambda: len(admin("GET", "/nodes").json()["nodes"]) == 1)
    return admin
