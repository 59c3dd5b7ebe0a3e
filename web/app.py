"""The Flask app of pink-web (REST API under /api/v1, web pages, rq-dashboard).

`create_app(config)` builds a fresh app from a `pink.config.Config` (or a
config file path): no connection is opened at import or creation time, so
every gunicorn worker and every test gets its own.
"""

from __future__ import annotations

import pymysql
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from pink import config as pink_config
from pink.errors import PinkError
from web import accounts, api, auth, blob_uploads, metrics, pages, peers, sweep_pages, sweeps
from web.resources import Resources


def create_app(config: pink_config.Config | str | None = None) -> Flask:
    if not isinstance(config, pink_config.Config):
        config = pink_config.load(config)
    app = Flask(__name__)
    if not config.web.secret_key:
        raise pink_config.ConfigError("[web] secret_key is required (sessions are signed with it)")
    app.config.update(SECRET_KEY=config.web.secret_key, SESSION_COOKIE_SECURE=True,
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      PERMANENT_SESSION_LIFETIME=12 * 3600,
                      MAX_CONTENT_LENGTH=None)
    app.extensions["pink"] = Resources(config)
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(accounts.bp)
    app.register_blueprint(blob_uploads.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(peers.bp)
    app.register_blueprint(sweeps.bp)
    app.register_blueprint(sweep_pages.bp)
    if config.web.dashboard:
        _mount_dashboard(app, config)
    app.before_request(_limit_body)
    _error_handlers(app)
    app.teardown_appcontext(lambda _exc: app.extensions["pink"].close_request())
    return app


def _mount_dashboard(app: Flask, config: pink_config.Config) -> None:
    """rq-dashboard for operators under /rq, admins only."""
    import rq_dashboard

    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = config.redis_url
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    app.before_request(auth.require_admin_for_dashboard)


SMALL_BODY = 64 * 2**10  # bytes: forms and JSON bodies (login, tokens, users, commits)
STREAMED = {"api.submit", "blob_uploads.put_blob", "peers.put_output"}  # bodies streamed to disk, capped there
BODY_LIMITS = {"blob_uploads.begin": 24 * 2**20,  # an image config (16 MiB) in base64
               "blob_uploads.commit": 4 * 2**20}  # a sweep's env sets (web.sweeps)


def _limit_body() -> None:
    """Cap what a request may send before anything reads it: a body parsed in
    memory (JSON, a form) is small, and the login endpoint answers anyone."""
    if request.endpoint not in STREAMED:
        request.max_content_length = BODY_LIMITS.get(request.endpoint, SMALL_BODY)


DRAIN_LIMIT = 64 * 2**20  # bytes of an unread request body we read to deliver an error


def _drain_body():
    """Read what is left of the request body so the client sees our error.

    A client still sending when the server answers and closes gets a broken
    connection instead of the error. Past DRAIN_LIMIT we close instead.
    """
    try:
        stream = request.stream
        for _ in range(DRAIN_LIMIT // (1 << 20)):
            if not stream.read(1 << 20):
                return True
    except Exception:  # noqa: BLE001 - a client that went away needs no answer
        return False
    return False


def _error_handlers(app: Flask) -> None:
    @app.errorhandler(PinkError)
    def pink_error(exc: PinkError):
        response = jsonify(error=exc.code, message=exc.message)
        if getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(exc.retry_after)
        if request.method in ("POST", "PUT") and not _drain_body():
            response.headers["Connection"] = "close"
        return response, exc.status

    @app.errorhandler(pymysql.err.MySQLError)
    def database_error(exc):
        message = f"the database failed: {exc.args[-1] if exc.args else exc}; try again shortly"
        return jsonify(error="unavailable", message=message), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path.startswith("/api/"):
            code = (exc.name or "error").lower().replace(" ", "_")
            return jsonify(error=code, message=exc.description), exc.code
        return exc
