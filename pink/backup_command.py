"""`pink-backup`: the command line of `pink.backup` (dumps, snapshots, their
restore) and of `pink.journal` (recover and redelete what a dump is too old
to hold). Apart from both so that neither imports the other: the journal
writes with the backups' compression and errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import zstandard

from pink import config as pink_config
from pink import journal
from pink.backup import (KINDS, BackupError, dump_mariadb, load_mariadb, newest, parse_stamp, prune, restore_etcd,
                         snapshot_etcd, snapshot_status, verify_dump)
from pink.errors import PinkError

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pink-backup", description="PINK's backups: dumps, snapshots, their restore, and recovery from the journal.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("mariadb-dump", help="dump PINK's database into --dir")
    d.add_argument("--options-file", required=True, help="root-only [client] option file (user, socket)")
    d.add_argument("--database", default="pink")
    d.add_argument("--dir", required=True)
    d.add_argument("--keep-days", type=float, help="then remove dumps older than this (not the newest)")

    lo = sub.add_parser("mariadb-load", help="check a dump whole, then load it (replaces the database)")
    lo.add_argument("file")
    lo.add_argument("--options-file", required=True)

    s = sub.add_parser("etcd-snapshot", help="save and check a snapshot of one etcd member into --dir")
    s.add_argument("--endpoint", required=True, help="one member's client URL")
    s.add_argument("--cacert", default="")
    s.add_argument("--cert", default="")
    s.add_argument("--key", default="")
    s.add_argument("--dir", required=True)
    s.add_argument("--keep-days", type=float)

    r = sub.add_parser("etcd-restore", help="a snapshot into a new member data directory")
    r.add_argument("file")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--initial-cluster", required=True)
    r.add_argument("--initial-advertise-peer-urls", required=True)
    r.add_argument("--initial-cluster-token", required=True)

    v = sub.add_parser("verify", help="check a backup file (a dump read whole, a snapshot's status)")
    v.add_argument("file")

    for command, help_text in (("recover", "re-create archive rows from this web node's journal"),
                               ("redelete", "delete again the tasks this web node deleted after the dump")):
        rc = sub.add_parser(command, help=help_text)
        rc.add_argument("--config", default=None)
        rc.add_argument("--since", default=None, help="the dump's time (its file name, a stamp or seconds)")

    pr = sub.add_parser("prune", help="remove backups older than --keep-days (never the newest)")
    pr.add_argument("--dir", required=True)
    pr.add_argument("--kind", choices=sorted(KINDS), required=True)
    pr.add_argument("--keep-days", type=float, required=True)

    n = sub.add_parser("newest", help="print the newest backup of a kind")
    n.add_argument("--dir", required=True)
    n.add_argument("--kind", choices=sorted(KINDS), required=True)
    return p


def _verify(path: str) -> dict:
    if path.endswith(KINDS["mariadb"][1]):
        return {"file": path, "sql_bytes": verify_dump(path)}
    if path.endswith(KINDS["etcd"][1]):
        with tempfile.TemporaryDirectory() as work:
            raw = os.path.join(work, "snapshot.db")
            try:
                with open(path, "rb") as src, open(raw, "wb") as dst:
                    zstandard.ZstdDecompressor().copy_stream(src, dst)
            except zstandard.ZstdError as exc:
                raise BackupError(f"{path} is damaged: {exc}") from None
            return {"file": path, **snapshot_status(raw)}
    raise BackupError(f"{path} is no PINK backup (*{KINDS['mariadb'][1]}, *{KINDS['etcd'][1]})")


def run(args) -> dict:
    os.umask(0o077)
    if args.command == "mariadb-dump":
        path = dump_mariadb(args.options_file, args.database, args.dir)
        removed = prune(args.dir, "mariadb", args.keep_days) if args.keep_days else []
        return {"file": str(path), "bytes": path.stat().st_size, "pruned": [str(p) for p in removed]}
    if args.command == "mariadb-load":
        return {"loaded": args.file, "sql_bytes": load_mariadb(args.file, args.options_file)}
    if args.command == "etcd-snapshot":
        path, status = snapshot_etcd(args.endpoint, args.dir, args.cacert, args.cert, args.key)
        removed = prune(args.dir, "etcd", args.keep_days) if args.keep_days else []
        return {"file": str(path), "bytes": path.stat().st_size, "status": status,
                "pruned": [str(p) for p in removed]}
    if args.command == "etcd-restore":
        status = restore_etcd(args.file, args.data_dir, args.name, args.initial_cluster,
                              args.initial_advertise_peer_urls, args.initial_cluster_token)
        return {"restored": args.file, "data_dir": args.data_dir, "status": status}
    if args.command == "verify":
        return _verify(args.file)
    if args.command in ("recover", "redelete"):
        since = parse_stamp(args.since) if args.since else None
        command = journal.recover if args.command == "recover" else journal.redelete
        return command(pink_config.load(args.config), since)
    if args.command == "prune":
        return {"pruned": [str(p) for p in prune(args.dir, args.kind, args.keep_days)]}
    if args.command == "newest":
        return {"file": str(newest(args.dir, args.kind))}
    raise BackupError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Prints one JSON object: what was done. Exits 1 (the unit fails) when it was not."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except (BackupError, PinkError) as exc:
        print(f"pink-backup {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1 if args.command in ("recover", "redelete") else None))
    if args.command == "recover" and (result["not_journaled"] or result["unreadable"]
                                      or result["missing_users"]):
        for line in filter(None, [result["not_journaled"]] + result["unreadable"]):
            print(f"pink-backup recover: WARNING: {line}", file=sys.stderr)
        if result["missing_users"]:
            print("pink-backup recover: WARNING: recovered tasks of users the dump does not hold "
                  f"(made after it): {', '.join(result['missing_users'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
