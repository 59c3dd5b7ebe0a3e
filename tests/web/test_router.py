"""The router (ansible/roles/nginx) in front of two web nodes: the role's
site file, rendered as Ansible renders it, run by a real nginx.

Uploads stream through it to either web node and their outputs come back;
the access log never holds a query string (task `env` values travel in
it); losing a web node does not fail requests that are safe to repeat."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import requests

from pink import config as pink_config_module
from devcluster.ports import free_port
from devcluster.processes import wait_until
from tests import images
from tests.helpers import Api, files_in_output, make_user

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "ansible" / "roles" / "nginx" / "templates" / "pink.conf.j2"
WRITER = 'CMD ["sh", "-c", "echo routed > /result.txt"]\n'

MAIN_CONF = """daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    access_log off;
    include {d}/pink.conf;
}}
"""


def _site(directory: Path, https_port: int, upstreams: list[str]) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["regex_escape"] = re.escape
    env.filters["regex_replace"] = lambda value, pattern, replacement: re.sub(pattern, replacement, value)
    text = env.from_string(SITE.read_text()).render(
        ansible_managed="test", nginx_upstreams=upstreams, nginx_http_port=free_port(),
        nginx_upload_nodes={f"web{n}": upstream for n, upstream in enumerate(upstreams, 1)},
        nginx_https_port=https_port, nginx_server_name="_", nginx_conf_dir=str(directory),
        nginx_upstream_ssl_name="localhost", nginx_proxy_timeout=3600, nginx_proxy_connect_timeout=3,
        nginx_max_body_size=2**30, nginx_fail_timeout=10,
        nginx_access_log=str(directory / "access.log"))
    # This machine may have no IPv6; the role listens on both.
    return "\n".join(line for line in text.splitlines() if "listen [::]" not in line) + "\n"


@pytest.fixture
def router(cluster, tmp_path):
    """Returns start(upstreams) -> the router's base URL; nginx is stopped afterwards."""
    directory = tmp_path / "nginx"
    directory.mkdir()
    for src, dest in (("web.pem", "cert.pem"), ("web.key", "key.pem"), ("ca.pem", "upstream-ca.pem")):
        shutil.copy(cluster.ssl_dir / src, directory / dest)
    procs = []

    def start(upstreams: list[str]) -> str:
        port = free_port()
        (directory / "pink.conf").write_text(_site(directory, port, upstreams))
        (directory / "nginx.conf").write_text(MAIN_CONF.format(d=directory))
        subprocess.run(["nginx", "-t", "-p", str(directory), "-c", str(directory / "nginx.conf")],
                       check=True, capture_output=True)
        procs.append(subprocess.Popen(["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"https://127.0.0.1:{port}"
        assert wait_until(lambda: requests.get(url + "/api/v1/health", timeout=2,
                                               verify=str(directory / "upstream-ca.pem")).ok, 20), \
            (directory / "error.log").read_text()
        return url

    start.directory = directory
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def two_web_nodes(pink_processes, pink_config, config_variant, tmp_path):
    """web1 and web2, each with pink-web, a worker and a leader; one runner."""
    path2 = config_variant("web2", host="web2", web_port=free_port(),
                           web={"spool_dir": str(tmp_path / "spool2"), "output_dir": str(tmp_path / "out2")})
    config2 = pink_config_module.load(path2)
    for path in (pink_config.path, path2):
        pink_processes.web(path, role="web" if path == pink_config.path else "web2")
        pink_processes.leader(path, role="leader" if path == pink_config.path else "leader2")
    pink_processes.worker(1, pink_config.path)
    pink_processes.worker(2, path2)
    pink_processes.runner()
    return pink_config, config2


def test_uploads_and_outputs_go_through_the_router_to_either_web_node(router, two_web_nodes, pink_processes,
                                                                      docker_client, tmp_path):
    config1, config2 = two_web_nodes
    url = router([config1.web.bind, config2.web.bind])
    routed = dataclasses.replace(config1, web=dataclasses.replace(config1.web, url=url))
    api = Api(routed, make_user(config1, "alice"))
    archive = images.build_archive(docker_client, "pink/test-routed:1", WRITER, tmp_path / "routed.tar")
    ids = [api.submit(archive, env="PINK_SECRET=hunter2").json()["task"]["id"] for _ in range(4)]
    tasks = [api.wait(task_id, timeout=180) for task_id in ids]
    assert all(t["state"] == "succeeded" for t in tasks), tasks
    for task in tasks:
        assert files_in_output(api("GET", f"/tasks/{task['id']}/output").content)["result.txt"] == b"routed\n"

    log = (router.directory / "access.log").read_text()
    assert len(re.findall(r'"POST /api/v1/tasks HTTP', log)) == 4
    assert "hunter2" not in log and "PINK_SECRET" not in log and "?" not in log
    served_by = set(re.findall(r"(127\.0\.0\.1:\d+)$", log, re.M))
    assert served_by == {config1.web.bind, config2.web.bind}  # both web nodes took requests

    web2 = next(n for n in pink_processes.started if n.endswith("-web2"))
    pink_processes.kill(web2)
    for _ in range(6):  # safe to repeat: each goes to web1, the first tries on web2 fail over
        r = api("GET", f"/tasks/{ids[0]}")
        assert r.status_code == 200 and r.json()["task"]["state"] == "succeeded", r.text
    r = api.http.put(url.rstrip("/") + f"/internal/v1/outputs/{ids[0]}-1.tar.zst", data=b"x",
                     verify=api.ca, timeout=30)
    assert r.status_code == 404 and "pink" not in r.text.lower()  # the router's own answer


def test_a_layer_upload_stays_on_the_web_node_that_began_it(router, two_web_nodes, docker_client, tmp_path):
    """`pink submit` through the router: a user's uploads begin on one web node
    (its layers are there: the second upload sends nothing), and each upload's
    blob and commit requests reach the node named in its id."""
    config1, config2 = two_web_nodes
    url = router([config1.web.bind, config2.web.bind])
    routed = dataclasses.replace(config1, web=dataclasses.replace(config1.web, url=url))
    archive = images.fresh_archive(docker_client, "routed-layers", tmp_path / "layers.tar")
    submitted, begun_by = [], {}
    for name in ("bea", "cai", "dan", "eve"):
        api = Api(routed, make_user(config1, name))
        mark = len((router.directory / "access.log").read_text())
        submitted += [(api, json.loads(api.cli("submit", archive, "--json").stdout)["id"]) for _ in range(2)]
        begun_by[name] = re.findall(r'"POST /api/v1/uploads HTTP\S+ 201 .* (\S+)$',
                                    (router.directory / "access.log").read_text()[mark:], re.M)
    tasks = [api.wait(task_id, timeout=180) for api, task_id in submitted]
    assert all(t["state"] == "succeeded" for t in tasks), tasks
    assert all(len(b) == 2 and len(set(b)) == 1 for b in begun_by.values()), begun_by  # one node per user
    sent = [t["timings"]["upload_bytes"] for t in tasks]
    assert sent[0] > 2**20 and all(n < 2**14 for n in sent[1::2]), sent  # a user's second upload: its config alone
    log = (router.directory / "access.log").read_text()
    node = {"web1": config1.web.bind, "web2": config2.web.bind}
    followed = re.findall(r'"(?:PUT|HEAD|POST) /api/v1/uploads/([\w.-]+?)\.[0-9a-f]{32}/\S* HTTP\S+ \d+ .* (\S+)$',
                          log, re.M)
    assert len(followed) >= 4 and all(node[host] == served for host, served in followed), followed
