"""What web nodes ask of each other under /internal/v1: a copy of an output.

Not for users: the router answers 404 for /internal/, and every request must
carry a signature made with the web nodes' shared secret (pink.outputs).
"""

from __future__ import annotations

import requests
from flask import Blueprint, jsonify, request

from pink import nodes, outputs
from pink.errors import BadRequest
from web.resources import res

bp = Blueprint("peers", __name__, url_prefix="/internal/v1")

PEER_HOP = "X-Pink-Peer-Hop"  # on a request one web node passes to another: never passed on again
PEER_TIMEOUT = (3.0, 30.0)  # seconds to connect to a peer (a silent one is dead), and between bytes


def output_from(hosts: list[str], path: str, headers: dict, problems: list[str]) -> requests.Response | None:
    """The streamed answer of the first live web node in `hosts` holding a copy of an
    output, to a GET of `path` with `headers` (the user's credentials, Range) and
    PEER_HOP; None, with why in `problems`, when none answers. The caller closes it.

    Peers' addresses come from their presence keys in etcd, never from the
    task record: a record cannot send a user's credentials elsewhere."""
    urls = nodes.web_urls(res().store)
    config = res().config
    for host in hosts:
        if host not in urls:
            problems.append(f"{host} is down")
            continue
        try:
            upstream = requests.get(urls[host].rstrip("/") + path, headers={**headers, PEER_HOP: "1"},
                                    stream=True, timeout=PEER_TIMEOUT, verify=config.web.ca or True)
        except requests.RequestException as exc:
            problems.append(f"{host} is unreachable ({type(exc).__name__})")
            continue
        if upstream.status_code == 404 or upstream.status_code >= 500:  # lost its copy, or failing
            problems.append(f"{host} answered {upstream.status_code}")
            upstream.close()
            continue
        return upstream
    return None


@bp.put("/outputs/<name>")
def put_output(name: str):
    """Take a copy of an output another web node fetched from a runner."""
    try:
        size = int(request.headers.get("Content-Length", ""))
    except ValueError:
        raise BadRequest("a copy needs its Content-Length", code="bad_copy") from None
    stored = outputs.receive(res().config, name, size, request.headers.get(outputs.DIGEST_HEADER, ""),
                             request.headers.get(outputs.SIGNATURE_HEADER, ""), request.stream)
    return jsonify(name=name, stored=stored), 201 if stored else 200
