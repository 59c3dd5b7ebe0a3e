"""PINK's version is git's (setuptools-scm, pyproject.toml).

The wheel a deploy builds (ansible/roles/common/files/build-wheel.sh, from a
copy of the checkout without .git) carries the version `git describe` gives
in the checkout, the same bytes for the same sources (so a second deploy
restarts nothing), and a tree without .git falls back to 0.0+unknown. The
installed version is what `pink --version` and the web's health answer show.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from devcluster.ports import free_port
from pink import config as pink_config
from pink.version import version

REPO = Path(__file__).resolve().parents[2]
BUILD_WHEEL = REPO / "ansible" / "roles" / "common" / "files" / "build-wheel.sh"
GIT = ("git", "-c", "user.name=PINK tests", "-c", "user.email=tests@pink.invalid",
       "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false")


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def build_wheel(source: Path, out: Path) -> Path:
    """PINK's wheel as a deploy builds it (the deploy's SOURCE_DATE_EPOCH)."""
    done = subprocess.run(["bash", str(BUILD_WHEEL), str(source), str(out), sys.executable],
                          check=True, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    return Path(done.stdout.strip())


def wheel_version(wheel: Path) -> str:
    """The Version of the wheel's own metadata (its name could lie)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return next(line.split(": ", 1)[1] for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Version: "))


def commit_of(version_: str) -> str:
    """The abbreviated commit in a version's local part (+gHASH, or +unknown.gHASH before any tag)."""
    found = re.search(r"\+(?:unknown\.)?g([0-9a-f]{7,40})\b", version_)
    assert found, f"no commit in {version_}"
    return found.group(1)


def copy_checkout(into: Path) -> Path:
    """The checkout's files (tracked, or untracked but not ignored), no .git."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, into / rel)
    return into


@pytest.fixture
def tagged_repo(tmp_path) -> Path:
    """A git repository of the checkout's files, committed and tagged v1.2.3."""
    repo = copy_checkout(tmp_path / "repo")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "release")
    git(repo, "tag", "v1.2.3")
    return repo


def test_the_wheel_carries_gits_version_and_is_reproducible(tagged_repo, tmp_path):
    first = build_wheel(tagged_repo, tmp_path / "a")
    assert first.name == "pink-1.2.3-py3-none-any.whl" and wheel_version(first) == "1.2.3"
    again = build_wheel(tagged_repo, tmp_path / "b")
    assert again.read_bytes() == first.read_bytes()  # same commit, same bytes: nothing to reinstall

    # An uncommitted change: the next version's dev release, the commit and
    # the date of SOURCE_DATE_EPOCH (not today's: the bytes stay the same).
    with (tagged_repo / "pink" / "__init__.py").open("a") as fh:
        fh.write("# changed\n")
    dirty = wheel_version(build_wheel(tagged_repo, tmp_path / "a"))
    assert re.fullmatch(r"1\.2\.4\.dev0\+g[0-9a-f]+\.d19800101", dirty), dirty
    assert git(tagged_repo, "rev-parse", "HEAD").startswith(commit_of(dirty))
    assert not first.exists()  # build-wheel.sh keeps the newest wheel only

    git(tagged_repo, "commit", "-q", "-am", "a change")
    committed = wheel_version(build_wheel(tagged_repo, tmp_path / "a"))
    assert re.fullmatch(r"1\.2\.4\.dev1\+g[0-9a-f]+", committed), committed
    assert git(tagged_repo, "rev-parse", "HEAD").startswith(commit_of(committed))


def test_a_tree_without_git_falls_back(tmp_path):
    """A tarball of the sources, without .git: pip still builds it, with a
    version that says it is unknown rather than a plausible number."""
    source = copy_checkout(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True,
                   env=env, timeout=600)
    wheel = next((tmp_path / "dist").glob("pink-*.whl"))
    assert wheel_version(wheel) == "0.0+unknown"


def test_this_checkouts_wheel_is_named_after_its_commit(tmp_path):
    """The deploy's wheel of this very checkout names HEAD's commit, and the
    distance from the last tag (or from the first commit, before any tag)."""
    built = wheel_version(build_wheel(REPO, tmp_path))
    tagged = subprocess.run(["git", "-C", str(REPO), "describe", "--tags", "--long", "--match", "*[0-9]*"],
                            capture_output=True, text=True)
    if tagged.returncode == 0:
        tag, distance, _ = tagged.stdout.strip().rsplit("-", 2)
    else:
        tag, distance = None, git(REPO, "rev-list", "--count", "HEAD")
    if distance == "0" and "+" not in built:
        assert built == tag.lstrip("v")
    else:
        assert f".dev{distance}+" in built, built
        assert git(REPO, "rev-parse", "HEAD").startswith(commit_of(built))


def test_health_names_the_version_even_when_degraded():
    """A rolling upgrade is checked by asking each web node which version it
    runs: the answer comes even while etcd, Redis and MariaDB do not."""
    from web.app import create_app

    port = free_port()  # nothing listens there
    config = pink_config.from_mapping({
        "etcd": {"endpoints": [f"127.0.0.1:{port}"]}, "redis_url": f"redis://127.0.0.1:{port}/0",
        "db": {"host": "127.0.0.1", "port": port},
        "web": {"secret_key": "s" * 48, "dashboard": False}})
    answer = create_app(config).test_client().get("/api/v1/health")
    assert answer.status_code == 503
    assert answer.get_json()["version"] == version() != "0.0+unknown"


def test_cli_prints_the_installed_version():
    out = subprocess.run([sys.executable, "-m", "pink_cli", "--version"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == f"pink {version()}"
