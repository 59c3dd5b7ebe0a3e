"""Fixtures for the fault matrix against the multi-host lab (`make test-cluster`).

The lab is what `make cluster` built (devcluster/lab.py): these tests read
build/cluster/hosts.json and state.json, talk to PINK through the router
like a user, and inject faults with Docker (kill, network disconnect) and
systemctl inside the machines.
"""

from __future__ import annotations

import pytest

from tests.cluster.lab import Lab, workload_archive


@pytest.fixture(scope="session")
def lab() -> Lab:
    found = Lab.load()
    found.wait_healthy()
    return found


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> str:
    """A busybox image that sleeps for $SECONDS, writes a file and exits."""
    return workload_archive(tmp_path_factory.mktemp("lab-image"))


@pytest.fixture(scope="session")
def big_lab_archive(tmp_path_factory) -> str:
    """The stream's image with 256 MiB more: its copy to a runner takes seconds."""
    return workload_archive(tmp_path_factory.mktemp("lab-big"), extra_bytes=256 << 20)


@pytest.fixture
def healed(lab):
    """Every machine running and connected after the test, whatever it broke."""
    yield lab
    lab.heal()
