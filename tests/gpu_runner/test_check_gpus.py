"""`pink-runner --check-gpus N`, a deploy's check (issue 19): a runner that
would offer another number of GPUs than the host should have (a broken
driver offers none) fails, saying what it found and what to check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = str(Path(sys.executable).with_name("pink-runner"))


def _check(config_path: str, expected: int) -> subprocess.CompletedProcess:
    return subprocess.run([RUNNER, "--config", config_path, "--check-gpus", str(expected)],
                          capture_output=True, text=True, timeout=60)


def test_the_expected_gpus_pass_and_others_fail(config_variant):
    declared = config_variant("two-gpus", runner={"gpus": ["GPU-a", "GPU-b"]})
    ok = _check(declared, 2)
    assert ok.returncode == 0 and "2 GPUs, as expected (declared" in ok.stdout, ok.stdout + ok.stderr
    short = _check(declared, 4)
    assert short.returncode != 0 and "finds 2 GPUs" in short.stderr and "not the 4" in short.stderr, short.stderr


def test_a_host_without_a_working_driver_fails_the_check(config_variant):
    """This machine has no NVIDIA driver: NVML finds nothing, as with a broken one."""
    discovering = config_variant("nvml", runner={"gpus": []})
    out = _check(discovering, 8)
    assert out.returncode != 0 and "finds 0 GPUs" in out.stderr and "nvidia-smi" in out.stderr, out.stderr
