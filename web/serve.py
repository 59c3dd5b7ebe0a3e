"""`pink-web`: serve the app with gunicorn over TLS.

Gunicorn's sync workers stream request and response bodies without
buffering them, which is what constant-memory uploads and downloads need;
TLS terminates here (the router may balance several of these). A client
that stalls mid-request or stops reading an answer is dropped after
`web.connections.STALL_SECONDS`, so it cannot hold a thread.

pink-web also announces its web node in etcd (`pink.nodes.WebPresence`):
the node's presence belongs to what holds its uploads. Each gunicorn worker
keeps it from gunicorn's `post_worker_init` hook, i.e. after the fork: the
etcd client (gRPC) must never be created in the master before it forks, and
a worker that dies is replaced by the master while the others keep the key.
"""

from __future__ import annotations

import threading

import click
from gunicorn.app.base import BaseApplication

from pink import config as pink_config
from pink import nodes
from web import connections


def threads_per_worker(config: pink_config.Config) -> int:
    """Long polls and followed logs each hold a thread: even with the whole
    node's follow cap in one worker, half its threads stay free for everyone else."""
    return max(16, 2 * config.limits.log_streams_per_node)


class _Gunicorn(BaseApplication):
    def __init__(self, config: pink_config.Config):
        self.pink_config = config
        super().__init__()

    def load_config(self):
        web = self.pink_config.web
        settings = {"bind": web.bind, "workers": web.workers,
                    "worker_class": "gthread",
                    "ssl_context": connections.ssl_context,  # a stalled client is dropped
                    "threads": threads_per_worker(self.pink_config),
                    "timeout": 3600, "graceful_timeout": 10, "accesslog": "-",
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
        config = self.pink_config
        store = worker.wsgi.extensions["pink"].store
        presence = nodes.WebPresence(store, config.host, config.web.url, config.node_ttl)
        presence.keep(threading.Event())

    def load(self):
        from web import create_app

        return create_app(self.pink_config)


@click.command()
@click.option("--config", "config_path", envvar="PINK_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False), help="PINK config file.")
def main(config_path: str) -> None:
    config = pink_config.load(config_path)
    if not (config.web.certfile and config.web.keyfile):
        raise click.UsageError("[web] certfile and keyfile are required: PINK serves HTTPS only")
    _Gunicorn(config).run()


if __name__ == "__main__":
    main()
