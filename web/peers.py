"""What web nodes ask of each other under /internal/v1: a copy of an output.

Not for users: the router answers 404 for /internal/, and every request must
carry a signature made with the web nodes' shared secret (pink.outputs).
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from pink import outputs
from pink.errors import BadRequest
from web.resources import res

bp = Blueprint("peers", __name__, url_prefix="/internal/v1")


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
