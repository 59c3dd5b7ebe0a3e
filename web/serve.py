"""`pink-web`: serve the app with gunicorn over TLS.

Gunicorn streams request and response bodies without buffering them, which
is what constant-memory uploads and downloads need; TLS terminates here (the
router may balance several of these). Its workers are gevent's: every
connection is a greenlet, so a followed log or a long poll that sits idle for
an hour holds a socket and a few kilobytes, not a thread, and a node's
followers (capped per user and per node, `web/log_streams.py`) never leave
health checks and submits waiting. gRPC (etcd) cooperates with gevent once
`init_gevent` ran, before the app makes its client; long CPU work gives way
(`pink.cooperative`). A client that stalls mid-request or stops reading an
answer is dropped after `web.connections.STALL_SECONDS`.

pink-web also announces its web node in etcd (`pink.nodes.WebPresence`):
the node's presence belongs to what holds its uploads. Each gunicorn worker
keeps it from gunicorn's `post_worker_init` hook, i.e. after the fork: the
etcd client (gRPC) must never be created in the master before it forks, and
a worker that dies is replaced by the master while the others keep the key.

The master imports nothing of the app (`web/__init__.py` says why): the
imports below that do are in the functions each worker runs.
"""

from __future__ import annotations

import resource
import threading

import click
from gunicorn.app.base import BaseApplication

from pink import config as pink_config
from web import connections


WORKER_CONNECTIONS = 1000  # connections one worker process serves at once (gunicorn's default, said aloud)
# Seconds a stopping worker lets its requests finish (an upload, a download):
# followed logs and long polls end at once instead, and their clients resume.
GRACEFUL_SECONDS = 60


def _raise_open_files_limit() -> None:
    """Let each worker hold its WORKER_CONNECTIONS sockets beside its files:
    systemd and most shells start a service with a soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * WORKER_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


class _Gunicorn(BaseApplication):
    def __init__(self, config: pink_config.Config):
        self.pink_config = config
        super().__init__()

    def load_config(self):
        web = self.pink_config.web
        settings = {"bind": web.bind, "workers": web.workers,
                    "worker_class": "gevent", "worker_connections": WORKER_CONNECTIONS,
                    "ssl_context": connections.ssl_context,  # a stalled client is dropped
                    "timeout": 3600, "graceful_timeout": GRACEFUL_SECONDS, "accesslog": "-",
                    # the path without the query string: `env` values may be secrets
                    "access_log_format": '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(L)ss',
                    "certfile": web.certfile or None, "keyfile": web.keyfile or None,
                    # one shared default control socket would make web nodes on one host collide
                    "control_socket_disable": True}
        for key, value in settings.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)
        self.cfg.set("post_worker_init", self._announce)

    def _announce(self, worker) -> None:
        """In each worker, after the fork: keep this web node's presence key
        (with the etcd client the worker's app already has)."""
        from pink import nodes

        config = self.pink_config
        resources = worker.wsgi.extensions["pink"]
        resources.worker = worker
        store = resources.store
        presence = nodes.WebPresence(store, config.host, config.web.url, config.node_ttl)
        presence.keep(threading.Event())

    def load(self):
        """In each worker, after gunicorn's gevent patching: gRPC's too, then the app."""
        import grpc.experimental.gevent

        grpc.experimental.gevent.init_gevent()
        from web.app import create_app

        return create_app(self.pink_config)


@click.command()
@click.option("--config", "config_path", envvar="PINK_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False), help="PINK config file.")
def main(config_path: str) -> None:
    config = pink_config.load(config_path)
    if not (config.web.certfile and config.web.keyfile):
        raise click.UsageError("[web] certfile and keyfile are required: PINK serves HTTPS only")
    _raise_open_files_limit()
    _Gunicorn(config).run()


if __name__ == "__main__":
    main()
