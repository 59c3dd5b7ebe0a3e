"""`pink-web`: serve the app with gunicorn over TLS.

Gunicorn's sync workers stream request and response bodies without
buffering them, which is what constant-memory uploads and downloads need;
TLS terminates here (the router may balance several of these).
"""

from __future__ import annotations

import click
from gunicorn.app.base import BaseApplication

from pink import config as pink_config


class _Gunicorn(BaseApplication):
    def __init__(self, config: pink_config.Config):
        self.pink_config = config
        super().__init__()

    def load_config(self):
        web = self.pink_config.web
        settings = {"bind": web.bind, "workers": web.workers, "worker_class": "gthread",
                    "threads": 16,  # long polls and followed logs each hold a thread
                    "timeout": 3600, "graceful_timeout": 10, "accesslog": "-",
                    # the path without the query string: `env` values may be secrets
                    "access_log_format": '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(L)ss',
                    "certfile": web.certfile or None, "keyfile": web.keyfile or None,
                    # one shared default control socket would make web nodes on one host collide
                    "control_socket_disable": True}
        for key, value in settings.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

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
