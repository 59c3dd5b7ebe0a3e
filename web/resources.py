"""The web app's handles on etcd, Redis and MariaDB, created on first use.

etcd and Redis clients are shared by the process (they are safe to share
between requests and must be opened after gunicorn forks and gevent patches,
hence lazily); a MariaDB connection is
opened per request and closed at teardown, like the Flask tutorial's db.
"""

from __future__ import annotations

import functools

from flask import current_app, g
from redis import Redis

from pink import db, redisconn
from pink.blob_store import BlobStore
from pink.config import Config
from pink.store import Store


class Resources:
    def __init__(self, config: Config):
        self.config = config
        self._schema_ready = False
        self.worker = None  # the gunicorn worker serving (web/serve.py): `stopping` asks it

    @property
    def stopping(self) -> bool:
        """The worker is shutting down (a restart): long requests should end now."""
        return self.worker is not None and not self.worker.alive

    @functools.cached_property
    def store(self) -> Store:
        return Store.from_config(self.config)

    @functools.cached_property
    def blobs(self) -> BlobStore:
        web = self.config.web
        return BlobStore(web.blob_root, web.blob_budget_bytes)

    @functools.cached_property
    def redis(self) -> Redis:
        return redisconn.connect(self.config)

    def db(self):
        if "pink_db" not in g:
            g.pink_db = db.connect(self.config.db)
            if not self._schema_ready:
                db.init_schema(g.pink_db)
                self._schema_ready = True
        return g.pink_db

    def close_request(self) -> None:
        conn = g.pop("pink_db", None)
        if conn is not None:
            conn.close()


def res() -> Resources:
    return current_app.extensions["pink"]
