"""`make demo`: a whole local cluster, an admin, and one task end to end.

The task's image is made here from the machine's busybox-static, since no
registry can be reached; the person is then told, last on the screen, where
PINK runs and how to log in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from devcluster.cluster import Cluster
from devcluster.pink_toml import WEB_PORT
from devcluster.processes import ClusterError
from pink.compat import tomllib

DEMO_IMAGE = "pink/demo:latest"
DEMO_DOCKERFILE = """\
FROM pink/busybox:demo
CMD ["/bin/sh", "-c", "mkdir -p /result && echo \\"hello from PINK on $(hostname) at $(date)\\" > /result/hello.txt && cat /result/hello.txt"]
"""


def build_busybox_image(tag: str, workdir: Path) -> None:
    """A tiny image from busybox-static (no registry is reachable here)."""
    rootfs = workdir / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    for sub in ("bin", "etc", "tmp", "result"):
        (rootfs / sub).mkdir(parents=True)
    for sub in ("tmp", "result"):  # writable whatever user the runner picks
        os.chmod(rootfs / sub, 0o1777)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    tar = workdir / "busybox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    subprocess.run(["docker", "import", "--change", 'CMD ["/bin/sh"]', str(tar), tag],
                   check=True, stdout=subprocess.DEVNULL)


def build_demo_image(workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    build_busybox_image("pink/busybox:demo", workdir)
    ctx = workdir / "context"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(DEMO_DOCKERFILE)
    # The legacy builder needs no buildx plugin and no network for FROM a local image.
    subprocess.run(["docker", "build", "-q", "-t", DEMO_IMAGE, str(ctx)], check=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"}, stdout=subprocess.DEVNULL)
    return DEMO_IMAGE


def pink_cli(cluster: Cluster, *args: str, capture: bool = False) -> str:
    out = subprocess.run([cluster.executable("pink"), *args], check=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout or ""


def run_demo(base: Path | str) -> None:
    """`make demo`: a whole cluster, an admin, and one task end to end; then how to use it."""
    cluster = Cluster(base)
    config = cluster.up(with_pink=True)
    url = tomllib.loads(config.read_text())["web"]["url"]
    password = None
    if "admin_token" not in cluster.state:
        created = json.loads(pink_cli(cluster, "admin", "user", "create", "admin", "--admin",
                                      "--json", "--config", str(config), capture=True))
        password = created["password"]
        cluster.state["admin_token"] = created["token"]  # cluster.json is mode 0600
        cluster._save()
    pink_cli(cluster, "login", "--url", url, "--token", cluster.state["admin_token"],
             "--ca", str(cluster.ssl_dir / "ca.pem"))
    image = build_demo_image(cluster.base / "demo")
    download = cluster.base / "demo-output"
    shutil.rmtree(download, ignore_errors=True)
    pink_cli(cluster, "submit", image, "--wait", "--download", str(download))
    print(read_demo_result(download, cluster.base / "demo" / "fs"))
    print(demo_welcome(cluster, config, password), file=sys.stderr)


def demo_welcome(cluster: Cluster, config: Path, password: str | None) -> str:
    """What a person needs after `make demo`, last on the screen where it is not lost."""
    port = int(tomllib.loads(config.read_text())["web"]["bind"].rsplit(":", 1)[1])
    pink = cluster.executable("pink")
    moved = "" if port == WEB_PORT else f"  (port {WEB_PORT} is taken, so the demo chose {port})"
    login = (f"Log in as admin with password {password}\n  (shown once: it is stored nowhere)" if password else
             "Log in as admin with the password the first `make demo` showed.")
    return "\n".join([
        "",
        f"PINK runs at https://localhost:{port}{moved}",
        f"  its certificate is signed by {cluster.ssl_dir / 'ca.pem'}: import that CA into the browser,",
        "  or accept the warning once.",
        login,
        f"  Lost it? {pink} admin user reset-password admin --config {config}",
        f"The CLI is logged in as admin: try `{pink} status`.",
        "Stop everything with `make down`.",
    ])


def read_demo_result(download: Path, into: Path) -> str:
    """Unpack the task's exported filesystem and return what it wrote."""
    archives = [download] if download.is_file() else sorted(download.rglob("*.tar.zst"))
    if not archives:
        raise ClusterError(f"no .tar.zst output under {download}")
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "--zstd", "-xf", str(archives[0]), "-C", str(into)], check=True)
    found = sorted(into.rglob("hello.txt"))
    if not found:
        raise ClusterError(f"the demo task's /result/hello.txt is not in {archives[0]}")
    return found[0].read_text().strip()
