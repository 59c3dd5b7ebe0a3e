"""The cluster's etcd: one member on loopback, PINK's source of truth.

It is talked to through etcd's HTTP/JSON gateway, so that starting a cluster
and inspecting it in tests and benchmarks need no gRPC client.
"""

from __future__ import annotations

import base64
import json
import urllib.request

from devcluster.ports import PortBook

# etcd keeps every revision until compacted: without compaction each state
# change of every task stays in its database for good. Periodic mode drops
# history older than this (a Go duration); PINK's watches are hints that are
# followed by a fresh read, so it never needs old revisions. Shorter than the
# Ansible role's 5m so that a demo, a test session or `make bench` sees it work.
ETCD_COMPACTION_RETENTION = "1m"


def b64(text: str) -> str:
    """etcd's JSON gateway carries keys and values in base64."""
    return base64.b64encode(text.encode()).decode()


class EtcdService(PortBook):
    """Start the cluster's etcd member, and the few calls tests and
    benchmarks make on it (delete a namespace, count keys, database size)."""

    @property
    def etcd_endpoint(self) -> str:
        return f"127.0.0.1:{self.state['ports']['etcd']}"

    def etcd(self, method: str, body: dict) -> dict:
        """One etcd v3 call through its HTTP/JSON gateway, e.g. ("kv/put",
        {"key": b64(k), "value": b64(v)}): no gRPC client needed."""
        req = urllib.request.Request(f"http://{self.etcd_endpoint}/v3/{method}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)

    def etcd_delete_prefix(self, prefix: str) -> None:
        """Remove a test's whole etcd namespace."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        self.etcd("kv/deleterange", {"key": b64(prefix), "range_end": b64(end)})

    def _etcd_answers(self) -> bool:
        url = f"http://{self.etcd_endpoint}/health"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.load(resp).get("health") == "true"

    def etcd_status(self) -> dict:
        """The member's maintenance status: dbSize (bytes of its database
        file), dbSizeInUse (bytes holding live data) and the revision."""
        status = self.etcd("maintenance/status", {})
        return {"db_size": int(status["dbSize"]), "db_size_in_use": int(status.get("dbSizeInUse", 0)),
                "revision": int(status["header"]["revision"])}

    def etcd_count(self, prefix: str) -> int:
        """How many keys start with `prefix` (counted by etcd, nothing transferred)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        got = self.etcd("kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
        return int(got.get("count", 0))

    def start_etcd(self, compaction_retention: str = ETCD_COMPACTION_RETENTION) -> str:
        """A single-member etcd on loopback; returns its endpoint host:port.

        Auto-compaction is periodic (`compaction_retention` of history kept);
        the backend quota stays etcd's default (2 GiB), which compaction keeps
        the database far below.
        """
        compaction = ["--auto-compaction-mode=periodic",
                      f"--auto-compaction-retention={compaction_retention}"]
        record = self.state["procs"].get("etcd")
        if record and self.alive("etcd") and not set(compaction) <= set(record["argv"]):
            self.stop("etcd")  # started by an older PINK without compaction: its data stays
        if self._reuse("etcd", self._etcd_answers):
            return self.etcd_endpoint
        client, peer = self.port("etcd"), self.port("etcd-peer")
        data = self.base / "etcd"
        self.start_process("etcd", [
            "etcd", "--name", "pink", "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"pink=http://127.0.0.1:{peer}",
            "--initial-cluster-state", "existing" if (data / "member").exists() else "new",
            *compaction,
        ])
        self._wait_ready("etcd", self._etcd_answers)
        return self.etcd_endpoint
