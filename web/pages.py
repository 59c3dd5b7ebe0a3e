"""The web pages: tasks, submit, task detail, nodes, usage, account.

Pages are thin: each renders a shell (web/templates) and web/static/pink.js
fills it by calling the same REST API as the CLI, with the session cookie
and a CSRF header; nothing here reads MariaDB. The account page's limits
are rendered here (`web.limits`: one read of the user's etcd index), so
they show without a script. Called by the browser; `auth` owns the login
page and the session.
"""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, session, url_for

from pink.units import limit_value
from pink.errors import PinkError
from pink.tasks import State
from web import limits

bp = Blueprint("pages", __name__)

# Scripts and styles come only from our static files (no inline code, no CDN);
# base.html repeats it in a meta tag.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _page(template: str, page: str, **context):
    if "user" not in session:  # back here after logging in
        target = request.full_path.rstrip("?")
        return redirect(url_for("auth.login_page", next=target) if target != "/" else url_for("auth.login_page"))
    return render_template(template, user=session["user"], csrf=session.get("csrf", ""), page=page,
                           **context)


@bp.after_request
def security_headers(response):
    """CSP and friends on every page (the login page's blueprint uses it too)."""
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


@bp.get("/")
def tasks():
    """The paged history; filters and the cursor live in the query string so pages are links."""
    args = request.args
    return _page("tasks.html", "tasks", states=[s.value for s in State],
                 state=args.get("state", ""), name=args.get("name", ""), owner=args.get("user", ""))


@bp.get("/submit")
def submit():
    """The upload form; `?again=<task id>` fills it with that task's parameters."""
    return _page("submit.html", "submit", again=request.args.get("again", ""))


@bp.get("/tasks/<task_id>")
def task(task_id: str):
    return _page("task.html", "task", task_id=task_id)


@bp.get("/nodes")
def nodes():
    return _page("nodes.html", "nodes")


@bp.get("/usage")
def usage():
    return _page("usage.html", "usage")


@bp.get("/account")
def account():
    name = session.get("user", {}).get("name")
    return _page("account.html", "account", limits=_limit_rows(name) if name else None)


def _limit_rows(name: str) -> list[tuple[str, str, str, str]] | None:
    """(limit, value, used, what it caps) for people; None when etcd cannot say now."""
    try:
        found = limits.of(name)
    except PinkError:
        return None
    return [(key, limit_value(key, entry["limit"], "no limit"), limit_value(key, entry["used"]), entry["caps"])
            for key, entry in found.items()]
