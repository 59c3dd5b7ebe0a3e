"""The lab's runners have room for the fault matrix's stream, so that a row's
recovery measures the fault and not a queue that grows whatever happens.

Runner sizing's auto value gives a GPU host one slot per GPU; the lab
declares 2 per runner, which left 4 slots for a stream that keeps about 7
tasks running, and every row's recovery doubled or worse (2026-12-08).
"""

from __future__ import annotations

import json

from devcluster import lab
from tests.cluster.lab import Stream

TEMPLATE = lab.REPO / "ansible" / "roles" / "common" / "templates" / "pink.toml.j2"


def test_the_labs_runners_run_more_at_once_than_the_stream_keeps_in_flight():
    runners = [h for h in lab.HOSTS if h.processing]
    stream = Stream(lab=None, archive="")
    assert len(runners) * lab.SLOTS_PER_RUNNER > stream.in_flight() > lab.GPUS_PER_RUNNER * len(runners)


def test_the_labs_inventory_gives_each_runner_those_slots(tmp_path, monkeypatch):
    monkeypatch.setattr(lab, "LAB_DIR", tmp_path)
    lab.write_inventory(tmp_path / "known_hosts", tmp_path / "key")
    settings = dict(line.split(": ", 1) for line in (tmp_path / "group_vars" / "pinklab.yml").read_text()
                    .splitlines() if not line.startswith("#"))
    assert json.loads(settings["common_runner_max_containers"]) == lab.SLOTS_PER_RUNNER
    assert "max_containers = {{ common_runner_max_containers" in TEMPLATE.read_text()
