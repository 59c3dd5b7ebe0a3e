"""Many users, one cluster (issue 18, "Done means"): in the `make cluster` lab,
with the shipped configuration, a user flooding follows, writing a big output
and forging layers leaves another user's tasks running to the end.

carol (the victim) submits ordinary tasks through the router while mallory,
at the same time:

1. follows a silent task of hers on both web nodes: waves of follows she
   drops after 2 s (5 x 16, the 80 of the report), then as many as her cap
   (`log_streams_per_user`, 8 per web node) lets her hold, and a few past it;
2. writes a 1 GiB output of random bytes. The shipped cap
   (`output_bytes_per_task`, 100 GiB) is too big to reach in the lab, and the
   lab's machines share the host's disk (tens of GiB free), so no web node's
   disk fills: the task must either succeed with its output or fail saying
   which limit or disk refused it, and leave no part file behind;
3. uploads a Docker 25 (OCI layout) archive, and two upload sessions, whose
   config lists the diff_ids of carol's private layer (a /secret.txt) over
   her own harmless bytes, once a runner's Docker holds carol's layers.

Users are made per run (`carol-<nonce>`, `mallory-<nonce>`) with the lab's
`pink admin user create` on web1, so a rerun starts from no history.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import threading
import time
import tomllib
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests

from devcluster import lab as devlab
from pink import image_archive
from pink_cli.client import Client
from pink.config import LimitsConfig
from pink.errors import PinkError
from pink.tasks import FINAL_NAMES
from tests import images
from tests.cluster.lab import Lab
from tests.helpers import files_in_output

pytestmark = pytest.mark.timeout(900)

CA = str(devlab.LAB_DIR / "ssl" / "ca.pem")
VICTIM_TASKS = 6  # carol's tasks
VICTIM_SECONDS = 25  # each one's run
VICTIM_WITHIN = 420.0  # seconds after her last submit by which every one of them must have ended
BIG_OUTPUT = 1 << 30  # bytes of random data mallory's big task writes (incompressible)
DROPPED_WAVES = 5  # waves of follows mallory drops after 2 s, 2 x the per-user cap each
PAST_CAP = 4  # follows mallory tries once she holds her cap on every web node
PROMPT = 10.0  # seconds within which a health check must answer during the flood
SETTLE = 20.0  # seconds within which a web node must notice dropped follows

# A task that runs until cancelled and never prints a byte (as tests/security/test_log_streams.py).
SILENT = 'CMD ["sh", "-c", "trap \'exit 0\' TERM; sleep 600 & wait"]\n'
# carol's task: prints her secret, runs a while, writes its output.
VICTIM = ('COPY secret.txt /secret.txt\n'
          'CMD ["sh", "-c", "cat /secret.txt; echo; sleep ${SLEEP:-1}; echo carol ${N} > /result.txt"]\n')
# How many follows a web node serves now (its node slots held), asked on the node itself.
OPEN_FOLLOWS = ("from pink import config; from web import log_streams; "
                "print(log_streams.open_streams(config.load('/etc/pink/pink.toml')))")
REFUSED_AS_PAST_CAP = f"429 log_streams_per_user = {LimitsConfig.log_streams_per_user}"


# ---------------------------------------------------------------- users and images

@dataclass
class User:
    """A lab user: the CLI's client and raw requests, both through the router."""

    name: str
    token: str
    client: Client

    @classmethod
    def create(cls, name: str) -> "User":
        created = json.loads(devlab.pink_on(devlab.host("web1"), "admin", "user", "create", name, "--json"))
        return cls(name, created["token"], Client(devlab.ROUTER_URL, created["token"], CA))

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 120)
        return requests.request(method, f"{devlab.ROUTER_URL}/api/v1{path}", headers=headers, verify=CA,
                                **kwargs)

    def follow(self, task_id: str) -> requests.Response | str:
        """A follow of the task's log on a connection of its own (headers read,
        body not), as `curl -N` holds one; a transport failure as its words."""
        try:
            return requests.get(f"{devlab.ROUTER_URL}/api/v1/tasks/{task_id}/logs", params={"follow": 1},
                                headers={"Authorization": f"Bearer {self.token}"}, stream=True,
                                timeout=(5, 30), verify=CA)
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"[:200]


def _build(tag: str, dockerfile: str, path: Path, files: dict[str, bytes] | None = None) -> str:
    client = docker.from_env()
    try:
        images.build_image(client, tag, dockerfile, files=files)
        return images.save_image(client, tag, path)
    finally:
        client.close()


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> dict:
    """carol's image: a private layer holding /secret.txt on the busybox base; its archive and config."""
    secret = f"secret-{uuid.uuid4().hex}"
    archive = _build(f"pink/test-lab-victim:{secret[7:15]}", VICTIM,
                     tmp_path_factory.mktemp("victim") / "victim.tar", {"secret.txt": secret.encode()})
    config = json.loads(images.read_member(archive, image_archive.inspect(archive).config))
    return {"secret": secret, "archive": archive, "config": config}


@pytest.fixture(scope="module")
def mallory_archive(tmp_path_factory) -> str:
    """mallory's image: busybox running a silent task (another command makes her big output)."""
    return _build(f"pink/test-lab-silent:{uuid.uuid4().hex[:8]}", SILENT,
                  tmp_path_factory.mktemp("mallory") / "silent.tar")


# ---------------------------------------------------------------- the lab's web nodes

def _web_nodes(lab: Lab) -> list[str]:
    return sorted(name for name, h in lab.hosts.items() if "web" in h["groups"])


def _config(lab: Lab, host: str) -> dict:
    return tomllib.loads(lab.sh(host, "cat /etc/pink/pink.toml"))


def _open_follows(lab: Lab, host: str) -> int:
    return int(lab.sh(host, f"/opt/pink/bin/python -c {shlex.quote(OPEN_FOLLOWS)}").split()[-1])


def _settle(lab: Lab, hosts: list[str], expected: int = 0, within: float = SETTLE) -> dict[str, int]:
    """Each web node's count of open follows once all are `expected` (or `within` s pass)."""
    deadline = time.monotonic() + within
    while True:
        counts = {h: _open_follows(lab, h) for h in hosts}
        if all(n == expected for n in counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(1)


def _parts(lab: Lab, hosts: list[str]) -> dict[str, list[str]]:
    """Part files left in each web node's output store."""
    found = {}
    for h in hosts:
        out = _config(lab, h)["web"]["output_dir"]
        found[h] = lab.sh(h, f"find {shlex.quote(out)} -name '*.part' 2>/dev/null || true").split()
    return found


# ---------------------------------------------------------------- mallory's follows, the health checks

def _describe(r: requests.Response | str) -> str:
    """A follow's answer in a few words: `200`, `429 <limit> = <n>`, or what failed."""
    if isinstance(r, str):
        return r
    if r.status_code != 429:
        return str(r.status_code)
    try:
        body = r.json()
    except ValueError:
        return f"429 {r.text[:100]}"
    limit, message = body.get("error", ""), body.get("message", "")
    named = f"{limit} = {LimitsConfig.log_streams_per_user}"
    return f"429 {named}" if named in message else f"429 {limit}: {message[:120]}"


class FollowFlood(threading.Thread):
    """mallory's follows of her silent task through the router: waves of
    2 x her cap that she drops after 2 s, each wave's drops to be noticed by
    both web nodes within SETTLE; then as many as the caps let her hold, a
    few past them, held until `stop`."""

    def __init__(self, lab: Lab, user: User, task_id: str, nodes: list[str]):
        super().__init__(name="follow-flood", daemon=True)
        self.lab, self.user, self.task_id, self.nodes = lab, user, task_id, nodes
        self.cap = LimitsConfig.log_streams_per_user
        self.answers: Counter[str] = Counter()  # every follow tried before she held her cap
        self.unsettled: list[dict[str, int]] = []  # per wave: open follows left once dropped
        self.held: list[requests.Response] = []
        self.held_per_node: dict[str, int] = {}
        self.past_cap: list[str] = []
        self.full, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._flood()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.full.set()
            self.stop.wait()
            for r in self.held:
                r.close()

    def _try(self) -> requests.Response | None:
        r = self.user.follow(self.task_id)
        self.answers[_describe(r)] += 1
        if isinstance(r, str):
            return None
        if r.status_code != 200:
            r.close()
            return None
        return r

    def _flood(self) -> None:
        for _ in range(DROPPED_WAVES):
            follows = [r for r in (self._try() for _ in range(len(self.nodes) * self.cap)) if r is not None]
            time.sleep(2)
            for r in follows:
                r.close()
            self.unsettled.append(_settle(self.lab, self.nodes))
        tries = 0
        while len(self.held) < len(self.nodes) * self.cap and tries < 8 * self.cap:
            tries += 1
            r = self._try()
            if r is None:
                time.sleep(0.2)
            else:
                self.held.append(r)
        self.held_per_node = {h: _open_follows(self.lab, h) for h in self.nodes}
        for _ in range(PAST_CAP):
            r = self.user.follow(self.task_id)
            self.past_cap.append(_describe(r))
            if not isinstance(r, str):
                r.close()


class HealthProbe(threading.Thread):
    """`GET /api/v1/health` through the router every second, and on each web
    node directly (curl on the router) every third, until `stop`."""

    def __init__(self, lab: Lab, node_urls: dict[str, str]):
        super().__init__(name="health-probe", daemon=True)
        self.lab, self.node_urls = lab, node_urls
        self.router: list[tuple[float, str]] = []  # (seconds, status or failure)
        self.nodes: list[tuple[str, str]] = []  # (host, "<status> <seconds>")
        self.stop = threading.Event()

    def run(self) -> None:
        rounds = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                outcome = str(requests.get(f"{devlab.ROUTER_URL}/api/v1/health", timeout=PROMPT,
                                           verify=CA).status_code)
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            self.router.append((time.monotonic() - started, outcome))
            if rounds % 3 == 0:
                for host, url in self.node_urls.items():
                    out = self.lab.sh("router", "curl -sk -o /dev/null -w '%{http_code} %{time_total}' "
                                                f"--max-time {PROMPT:.0f} {shlex.quote(url + '/api/v1/health')}",
                                      check=False)
                    self.nodes.append((host, out.strip()))
            rounds += 1
            self.stop.wait(1.0)

    def failures(self) -> list[str]:
        bad = [f"router: {outcome} after {s:.1f}s" for s, outcome in self.router
               if outcome != "200" or s >= PROMPT]
        return bad + [f"{host}: {out}" for host, out in self.nodes if not out.startswith("200 ")]


# ---------------------------------------------------------------- the forgery (tests/images.py)

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _forge(mallory: User, victim_config: dict, into: Path) -> dict[str, requests.Response]:
    """mallory's forgeries of carol's layers: a whole archive (Docker 25
    layout) and upload sessions claiming either layout; each door's answer."""
    answers = {}
    config, layers = images.forgery(victim_config)
    with open(images.archive_of(into / "forged-oci.tar", config, layers), "rb") as fh:
        answers["whole archive (oci)"] = mallory("POST", "/tasks", data=fh,
                                                 headers={"Content-Type": "application/x-tar"})
    for layout in ("oci", "docker"):
        config, layers = images.forgery(victim_config)
        begun = mallory("POST", "/uploads", json={
            "config": base64.b64encode(config).decode(), "layout": layout,
            "layers": [{"digest": _sha(x), "size": len(x)} for x in layers]})
        if begun.status_code != 201:
            answers[f"upload session ({layout}): begin"] = begun
            continue
        upload = begun.json()["upload"]
        for layer in layers:
            put = mallory("PUT", f"/uploads/{upload}/blobs/{_sha(layer)}", data=layer)
            assert put.status_code == 201, put.text
        answers[f"upload session ({layout})"] = mallory("POST", f"/uploads/{upload}/commit", json={"proofs": {}})
    return answers


# ---------------------------------------------------------------- waiting

def _wait_final(client: Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """The tasks that ended within `timeout`, by id (a refused read is tried again)."""
    deadline = time.monotonic() + timeout
    final: dict[str, dict] = {}
    while True:
        for task_id in ids:
            if task_id in final:
                continue
            try:
                task = client.get(task_id)
            except PinkError:
                continue
            if task["state"] in FINAL_NAMES:
                final[task_id] = task
        if len(final) == len(ids) or time.monotonic() > deadline:
            return final
        time.sleep(2)


def _wait_for(client: Client, ids: list[str], states: set[str], timeout: float) -> dict:
    """The first of the tasks seen in one of `states` (all of them ending elsewhere fails at once)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for task_id in ids:
            try:
                seen[task_id] = client.get(task_id)
            except PinkError:
                continue
            if seen[task_id]["state"] in states:
                return seen[task_id]
        if len(seen) == len(ids) and all(t["state"] in FINAL_NAMES for t in seen.values()):
            break
        time.sleep(1)
    raise AssertionError(f"none of {ids} reached {sorted(states)} within {timeout:.0f}s: "
                         f"{ {t: (v['state'], v.get('error')) for t, v in seen.items()} }")


def _shipped_limits(lab: Lab) -> dict[str, dict]:
    """[limits] as every PINK host of the lab has it, where it differs from the shipped defaults."""
    shipped = {"log_streams_per_user": LimitsConfig.log_streams_per_user,
               "log_streams_per_node": LimitsConfig.log_streams_per_node,
               "output_bytes_per_task": LimitsConfig.output_bytes_per_task,
               "upload_sessions_per_user": LimitsConfig.upload_sessions_per_user,
               "live_tasks_per_user": LimitsConfig.live_tasks_per_user}
    differs = {}
    for host in (*_web_nodes(lab), "run1", "run2"):
        limits = _config(lab, host)["limits"]
        wrong = {k: limits.get(k) for k, v in shipped.items() if limits.get(k) != v}
        if wrong:
            differs[host] = wrong
    return differs


# ---------------------------------------------------------------- the test

def test_a_flooding_filling_forging_user_leaves_another_users_tasks_running_to_the_end(
        lab, victim, mallory_archive, tmp_path):
    """One user cannot take the cluster from another, with the shipped limits:
    while mallory drops 80 follows of a silent task, then holds her cap of
    follows (8 per web node) and tries past it (429 naming
    `log_streams_per_user`), writes a 1 GiB output, and forges carol's private
    layer (400 `diff_id_mismatch` at every door, no task made, the secret
    printed by no task of hers), every one of carol's tasks ends `succeeded`
    with its output and log downloadable; health answers through the router
    and on each web node within 10 s all along; each web node notices dropped
    follows within 20 s; the big output is stored or refused with a reason and
    leaves no part file; and once mallory's silent task is cancelled no task
    of either user is left unfinished."""
    nonce = uuid.uuid4().hex[:6]
    carol, mallory = User.create(f"carol-{nonce}"), User.create(f"mallory-{nonce}")
    nodes = _web_nodes(lab)
    assert len(nodes) == 2, nodes
    assert _shipped_limits(lab) == {}, "the lab runs other limits than the shipped defaults"
    probe = HealthProbe(lab, {h: _config(lab, h)["web"]["url"].rstrip("/") for h in nodes})
    silent = mallory.client.submit(mallory_archive, name="silent", timeout=900)["id"]
    flood: FollowFlood | None = None
    big: str | None = None
    carol_ids: list[str] = []
    forged: dict[str, requests.Response] = {}
    started = time.monotonic()

    def say(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {what}", flush=True)

    try:
        try:
            _wait_for(mallory.client, [silent], {"running"}, 300)
            say(f"mallory's silent task {silent} runs; the flood starts")
            probe.start()
            flood = FollowFlood(lab, mallory, silent, nodes)
            flood.start()
            for i in range(VICTIM_TASKS):
                carol_ids.append(carol.client.submit(victim["archive"], name=f"carol-{i}",
                                                     env={"SLEEP": str(VICTIM_SECONDS), "N": str(i)})["id"])
                if i == 0:
                    big = mallory.client.submit(mallory_archive, name="big-output", timeout=900,
                                                cmd=f"sh -c 'head -c {BIG_OUTPUT} /dev/urandom > /big'")["id"]
                time.sleep(1)
            say(f"carol submitted {carol_ids}; mallory's big output is {big}")
            first = _wait_for(carol.client, carol_ids, {"running", *FINAL_NAMES}, 300)
            say(f"carol's {first['id']} is {first['state']} on {first.get('node')}: mallory forges her layers")
            forged = _forge(mallory, victim["config"], tmp_path)
            assert flood.full.wait(300), "mallory's follows never reached her cap"
            say(f"mallory holds {len(flood.held)} follows {flood.held_per_node}; past the cap: {flood.past_cap}")
            carol_final = _wait_final(carol.client, carol_ids, VICTIM_WITHIN)
            say(f"carol's tasks: {Counter(t['state'] for t in carol_final.values())}")
            big_final = _wait_final(mallory.client, [big], 300).get(big)
            say("mallory's big output: "
                f"{big_final and (big_final['state'], big_final.get('error'), big_final.get('output'))}")
        finally:
            if flood is not None:
                flood.stop.set()
                flood.join(60)
            try:
                if mallory.client.get(silent)["state"] not in FINAL_NAMES:
                    mallory.client.cancel(silent)
            except PinkError as exc:
                say(f"cancelling {silent}: {exc}")
            probe.stop.set()
            probe.join(60)

        # The follows: served, capped per user and node, dropped ones noticed.
        assert flood.error is None, repr(flood.error)
        allowed = {"200", REFUSED_AS_PAST_CAP}
        assert set(flood.answers) <= allowed, f"follows answered otherwise: {flood.answers}"
        assert flood.answers["200"] >= DROPPED_WAVES * LimitsConfig.log_streams_per_user, flood.answers
        assert all(set(wave.values()) == {0} for wave in flood.unsettled), \
            f"dropped follows still held by a web node {SETTLE:.0f}s on: {flood.unsettled}"
        assert len(flood.held) == len(nodes) * LimitsConfig.log_streams_per_user, flood.answers
        assert flood.held_per_node == {h: LimitsConfig.log_streams_per_user for h in nodes}, flood.held_per_node
        assert flood.past_cap == [REFUSED_AS_PAST_CAP] * PAST_CAP, flood.past_cap
        assert (left := _settle(lab, nodes)) == {h: 0 for h in nodes}, f"closed follows still held: {left}"

        # Health answered all along, through the router and on each node.
        assert len(probe.router) >= 30, f"only {len(probe.router)} health checks were made"
        assert not probe.failures(), probe.failures()[:20]
        say(f"health: {len(probe.router)} checks through the router (slowest "
            f"{max(s for s, _ in probe.router):.2f}s), {len(probe.nodes)} on the nodes")

        # The forgeries: refused at every door; no task of mallory's but her own two, none printing the secret.
        for door, r in forged.items():
            assert r.status_code == 400 and r.json().get("error") == "diff_id_mismatch", \
                (door, r.status_code, r.text)
        ended = _wait_final(mallory.client, [silent], 180)
        assert silent in ended, f"mallory's cancelled silent task {silent} did not end"
        mine = {t["id"]: t for t in mallory.client.list()}
        assert set(mine) == {silent, big}, f"mallory has tasks she did not submit: {sorted(mine)}"
        for task_id in mine:
            assert victim["secret"].encode() not in b"".join(mallory.client.logs(task_id)), task_id

        # carol's tasks: every one succeeded, with its output and log.
        assert set(carol_final) == set(carol_ids), \
            f"carol's tasks not final after {VICTIM_WITHIN:.0f}s: {sorted(set(carol_ids) - set(carol_final))}"
        failed = {t: (v["state"], v.get("error")) for t, v in carol_final.items() if v["state"] != "succeeded"}
        assert not failed, failed
        for i, task_id in enumerate(carol_ids):
            path = carol.client.download(task_id, tmp_path / f"{task_id}.tar.zst")
            assert files_in_output(path.read_bytes()).get("result.txt") == f"carol {i}\n".encode(), task_id
            assert victim["secret"].encode() in b"".join(carol.client.logs(task_id)), task_id

        # The big output: stored whole, or refused saying why; no part file left on a web node.
        assert big_final is not None, f"mallory's big-output task {big} did not end"
        if big_final["state"] == "succeeded":
            assert big_final["output"] and big_final["output"]["size"] >= BIG_OUTPUT, big_final
        else:
            reasons = ("output_bytes_per_task", "holds only", "bytes free for outputs", "No space left")
            assert any(words in (big_final.get("error") or "") for words in reasons), big_final
        deadline = time.monotonic() + 30
        while any((parts := _parts(lab, nodes)).values()) and time.monotonic() < deadline:
            time.sleep(2)
        assert not any(parts.values()), f"part files left in the output stores: {parts}"

        # Nothing left unfinished by either user.
        for user in (carol, mallory):
            live = {t["id"]: t["state"] for t in user.client.list() if t["state"] not in FINAL_NAMES}
            assert not live, f"{user.name}'s tasks left unfinished: {live}"
    finally:
        if big is not None:  # a GiB on two web nodes: mallory deletes it once it ended
            try:
                if mallory.client.get(big)["state"] in FINAL_NAMES:
                    mallory.client.cancel(big)
            except PinkError as exc:
                say(f"deleting {big}: {exc}")
