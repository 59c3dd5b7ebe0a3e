"""The sweep page: a shell that web/static/sweep.js fills from `GET /api/v1/sweeps/<id>`."""

from __future__ import annotations

from flask import Blueprint

from web.pages import _page, security_headers

bp = Blueprint("sweep_pages", __name__)
bp.after_request(security_headers)  # the pages' CSP


@bp.get("/sweeps/<sweep_id>")
def sweep(sweep_id: str):
    return _page("sweep.html", "sweep", sweep_id=sweep_id)
