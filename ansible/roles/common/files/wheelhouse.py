#!/usr/bin/env python3
"""Build the wheelhouse an offline deploy installs PINK's dependencies from
(`make wheelhouse`; docs/operations.md, "Offline installs").

Run it on a machine that reaches a package index; the control host of an
air-gapped lab then needs only the result. For each target Python (the
system Python of a system the roles know, if PINK's Requires-Python admits
it), OUT/cpXY/ holds binary wheels of PINK's dependencies for x86_64 Linux,
and OUT/cpXY.tar the same files as one reproducible archive: the common role
(`common_wheelhouse`) copies that one file to each host, so an unchanged
wheelhouse costs one checksum per host, not one per wheel. PINK's own wheel
is not in it: every deploy builds that from the checkout.

pip download picks wheels for the target's tags and Requires-Python, but
evaluates dependencies' markers with the Python running it: redis needs
async-timeout only before 3.11.3, and Debian 12's Python is 3.11.2. So the
closure is checked here with each target's own marker environment, and what
is missing is downloaded until nothing is.

usage: wheelhouse.py OUT [--python 3.11 ...] [--extra REQUIREMENT ...] [--source DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]  # files -> common -> roles -> ansible -> the checkout


@dataclass(frozen=True)
class Target:
    """A host Python: its wheel tag, and the full version its markers see."""

    tag: str
    version: str
    systems: str


# The system Pythons of the systems in docs/operations.md, "Supported systems".
TARGETS = (
    Target("cp310", "3.10.12", "Ubuntu 22.04"),
    Target("cp311", "3.11.2", "Debian 12"),
    Target("cp312", "3.12.3", "Ubuntu 24.04"),
)
# glibc 2.34 or later on all of them; devcluster/lab.py's list, and 2_34.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_34_x86_64")
MAX_ROUNDS = 5  # each round adds what the last one's markers missed
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))  # the archives' timestamps


@dataclass(frozen=True)
class Dist:
    """A downloaded wheel's name, version and declared requirements."""

    name: str
    version: Version
    requires: tuple[Requirement, ...]
    requires_python: SpecifierSet


def read_wheel(path: Path) -> Dist:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        headers = Parser().parsestr(zf.read(meta).decode())
    return Dist(name=canonicalize_name(name), version=version,
                requires=tuple(Requirement(r) for r in headers.get_all("Requires-Dist") or ()),
                requires_python=SpecifierSet(headers.get("Requires-Python") or ""))


def marker_environment(target: Target) -> dict[str, str]:
    """What a marker sees on the target host (CPython on x86_64 Linux)."""
    return {"implementation_name": "cpython", "implementation_version": target.version,
            "os_name": "posix", "platform_machine": "x86_64",
            "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "",
            "python_full_version": target.version,
            "python_version": ".".join(target.version.split(".")[:2]), "sys_platform": "linux"}


def applies(req: Requirement, env: dict[str, str], extras: frozenset[str]) -> bool:
    """Whether a dependency declared by a distribution installed with `extras` is needed."""
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def missing_requirements(target: Target, wheels: dict[str, Dist], roots: list[Requirement]) -> list[str]:
    """Requirements of the closure of `roots` that no wheel in `wheels`
    satisfies, with the target's markers: what pip's resolution left out."""
    env = marker_environment(target)
    missing: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [req for req in roots if applies(req, env, frozenset())]
    while queue:
        req = queue.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        dist = wheels.get(name)
        if dist is None or not req.specifier.contains(dist.version, prereleases=True):
            req_text = f"{req.name}{'[' + ','.join(sorted(extras)) + ']' if extras else ''}{req.specifier}"
            missing.append(req_text)
            continue
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        queue.extend(r for r in dist.requires if applies(r, env, extras))
    return sorted(set(missing))


def pip_download(target: Target, dest: Path, requirements: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(dest),
                    "--only-binary=:all:", "--python-version", target.version,
                    "--implementation", "cp", "--abi", target.tag,
                    *(f"--platform={p}" for p in PLATFORMS), *requirements], check=True)


def build_pink(source: Path, into: Path) -> Path:
    """PINK's wheel, built as a deploy builds it: its requirements are the roots."""
    out = subprocess.run(["bash", str(HERE / "build-wheel.sh"), str(source), str(into), sys.executable],
                         check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def write_tar(wheels: list[Path], path: Path) -> None:
    """One archive of the wheels, byte for byte the same for the same wheels
    (sorted, fixed owner, mode and time), so a rebuilt, unchanged wheelhouse
    copies nothing on the next deploy."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in sorted(wheels, key=lambda p: p.name):
            info = tarfile.TarInfo(wheel.name)
            info.size, info.mtime, info.mode = wheel.stat().st_size, EPOCH, 0o644
            with wheel.open("rb") as fh:
                tar.addfile(info, fh)
    partial.replace(path)


def build_target(target: Target, pink: Path, extras: list[str], out: Path) -> list[Path]:
    """OUT/<tag>/ and OUT/<tag>.tar: the dependencies' wheels, complete for
    the target's markers. Built aside and swapped in, so a failed build
    leaves the last good one."""
    staging = out / f"{target.tag}.partial"
    roots = [Requirement(f"pink=={read_wheel(pink).version}"), *(Requirement(e) for e in extras)]
    requirements = [str(pink), *extras]
    for _ in range(MAX_ROUNDS):
        shutil.rmtree(staging, ignore_errors=True)  # one resolution's wheels, not two versions of one
        staging.mkdir(parents=True)
        pip_download(target, staging, requirements)
        wheels = {d.name: d for d in map(read_wheel, staging.glob("*.whl"))}
        wheels.setdefault("pink", read_wheel(pink))
        missing = missing_requirements(target, wheels, roots)
        if not missing:
            break
        print(f"{target.tag}: adding what {target.version}'s markers need: {', '.join(missing)}",
              file=sys.stderr)
        requirements += [m for m in missing if m not in requirements]
    else:
        raise SystemExit(f"{target.tag}: still missing after {MAX_ROUNDS} rounds: {', '.join(missing)}")
    for own in staging.glob("pink-*.whl"):
        own.unlink()
    final = out / target.tag
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    files = sorted(final.glob("*.whl"))
    write_tar(files, out / f"{target.tag}.tar")
    return files


def choose_targets(asked: list[str], requires_python: SpecifierSet) -> list[Target]:
    """The asked targets (3.11 or cp311), else every known one PINK admits."""
    if not asked:
        chosen = [t for t in TARGETS if requires_python.contains(t.version)]
        for t in TARGETS:
            if t not in chosen:
                print(f"skipping {t.tag} ({t.systems}'s Python {t.version}): PINK requires "
                      f"Python {requires_python}", file=sys.stderr)
        return chosen
    by_name = {t.tag: t for t in TARGETS} | {t.version.rsplit(".", 1)[0]: t for t in TARGETS}
    unknown = [a for a in asked if a not in by_name]
    if unknown:
        raise SystemExit(f"unknown target Python {', '.join(unknown)}: one of {', '.join(by_name)}")
    chosen = [by_name[a] for a in dict.fromkeys(asked)]
    refused = [t.tag for t in chosen if not requires_python.contains(t.version)]
    if refused:
        raise SystemExit(f"PINK requires Python {requires_python}: no wheelhouse for {', '.join(refused)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the wheelhouse directory (e.g. build/wheelhouse)")
    parser.add_argument("--python", action="append", default=[],
                        help="a target: 3.10, 3.11, 3.12 or cp310, ... (default: all PINK admits)")
    parser.add_argument("--extra", action="append", default=[],
                        help="another requirement for the venv (common_extra_python_packages)")
    parser.add_argument("--source", type=Path, default=REPO, help="the PINK checkout")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pink = build_pink(args.source, Path(tmp))
        for target in choose_targets(args.python, read_wheel(pink).requires_python):
            files = build_target(target, pink, args.extra, args.out)
            size = sum(f.stat().st_size for f in files)
            print(f"{args.out / target.tag}: {len(files)} wheels, {size / 2**20:.0f} MiB "
                  f"({target.systems}, Python {target.version}); {args.out / target.tag}.tar")


if __name__ == "__main__":
    main()
