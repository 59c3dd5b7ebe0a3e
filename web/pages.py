"""The web pages: task list with upload, task detail with logs, nodes.

Pages are thin: they render a shell and their JavaScript calls the same
REST API as the CLI, with the session cookie and a CSRF header.
"""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, session, url_for

bp = Blueprint("pages", __name__)


def _page(template: str, **context):
    if "user" not in session:
        return redirect(url_for("auth.login_page"))
    return render_template(template, user=session["user"], csrf=session.get("csrf", ""), **context)


@bp.get("/")
def tasks():
    return _page("tasks.html")


@bp.get("/tasks/<task_id>")
def task(task_id: str):
    return _page("task.html", task_id=task_id)


@bp.get("/nodes")
def nodes():
    return _page("nodes.html")
