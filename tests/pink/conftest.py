"""Fixtures of the core's tests."""

from __future__ import annotations

import docker
import pytest


@pytest.fixture(scope="session")
def docker_client():
    """Docker alone: the archive and blob tests need none of the cluster's other services."""
    client = docker.from_env()
    client.ping()
    yield client
    client.close()
