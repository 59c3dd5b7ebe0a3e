"""A rolling upgrade stops nobody's work (issue 19): deploying a new build
while 20 tasks run (some for two minutes) restarts every PINK unit, one host
at a time; every task succeeds at its first attempt and the router answers
throughout. The lab must be up (`make cluster`)."""

from __future__ import annotations

import threading
import time

import requests

from devcluster import lab as devlab
from pink.tasks import FINAL_NAMES
from tests.cluster.lab import make

TASKS = 20
LONG = 120  # seconds a quarter of the tasks run: through the whole deploy
HEALTH_EVERY = 0.25  # seconds between the router probes


class RouterProbe:
    """Asks the router for health every HEALTH_EVERY s, counting what was not an answer."""

    def __init__(self):
        self.asked, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RouterProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        ca = str(devlab.LAB_DIR / "ssl" / "ca.pem")
        while not self._stop.wait(HEALTH_EVERY):
            self.asked += 1
            try:
                r = requests.get(devlab.ROUTER_URL + "/api/v1/health", verify=ca, timeout=10)
                if r.status_code != 200:
                    self.failures.append(f"{time.strftime('%T')} {r.status_code} {r.text[:80]}")
            except requests.RequestException as exc:
                self.failures.append(f"{time.strftime('%T')} {type(exc).__name__}")


def _deploy_new_build() -> str:
    """`make deploy` with a wheel built at another SOURCE_DATE_EPOCH: new
    bytes for every host, so every PINK unit is restarted. Its log."""
    epoch = 315532800 + int(time.time()) % 86400  # another build of the same sources
    return make("deploy", f"ANSIBLE_ARGS=-e common_wheel_epoch={epoch}", log="deploy-upgrade")


def test_a_rolling_upgrade_stops_no_task(lab, archive):
    tasks = [lab.client.submit(archive, name=f"upgrade-{i}", env={"SECONDS": str(LONG if i % 4 == 0 else 20)},
                               gpus=i % 2)["id"] for i in range(TASKS)]
    deadline = time.monotonic() + 120
    while sum(lab.client.get(t)["state"] == "running" for t in tasks) < 4:
        assert time.monotonic() < deadline, "the tasks never ran"
        time.sleep(1)
    with RouterProbe() as probe:
        log = _deploy_new_build()
        final = {}
        deadline = time.monotonic() + 900
        while len(final) < TASKS and time.monotonic() < deadline:
            for t in tasks:
                task = lab.client.get(t)
                if task["state"] in FINAL_NAMES:
                    final[t] = task
            time.sleep(2)
    restarted = [line for line in log.splitlines() if "Restart this host's PINK units" in line]
    assert restarted, "the deploy restarted nothing: was the build new?"
    ended = [(t["state"], t["attempt"], t.get("error")) for t in final.values()]
    assert len(final) == TASKS, f"{TASKS - len(final)} tasks never ended"
    assert all(state == "succeeded" and attempt == 1 for state, attempt, _ in ended), ended
    assert not probe.failures, f"the router failed {len(probe.failures)} of {probe.asked} probes: {probe.failures[:10]}"
    print(f"\nrolling upgrade: {TASKS} tasks, all at attempt 1; router answered {probe.asked} of {probe.asked} probes")
