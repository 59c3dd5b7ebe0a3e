"""What every `pink` command shares: the connection options and the context object.

`connection_options` defines `--url/--token/--ca` once (the group takes them
with their PINK_* env vars; `pink login` takes them again to name a new
server). `CliContext` merges them over the saved settings and builds the
API client lazily, so commands that need no server (`pink admin`) never read
the settings file. `PinkGroup` turns a PinkError into a message and exit 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from pink_cli import settings as settings_mod
from pink_cli.client import Client
from pink.errors import PinkError

_CONNECTION = (
    ("--url", "PINK_URL", "Base URL of the PINK server, e.g. https://pink.lab:8443."),
    ("--token", "PINK_TOKEN", "API token (see `pink login`)."),
    ("--ca", "PINK_CA", "CA certificate file to trust for the server's TLS."),
)


def connection_options(envvars: bool = True):
    """Decorator adding --url/--token/--ca; with `envvars`, backed by PINK_URL/PINK_TOKEN/PINK_CA."""
    def decorate(func):
        for flag, envvar, help_text in reversed(_CONNECTION):
            func = click.option(flag, envvar=envvar if envvars else None, metavar=flag[2:].upper(),
                                show_envvar=envvars, help=help_text)(func)
        return func
    return decorate


class CliContext:
    """The group's options and, on demand, the saved settings and a Client."""

    def __init__(self, url: str | None = None, token: str | None = None, ca: str | None = None,
                 settings_path: Path | None = None):
        self.overrides = {"url": url, "token": token, "ca": ca}
        self.settings_path = settings_path or settings_mod.default_path()
        self._settings: settings_mod.Settings | None = None
        self._client: Client | None = None

    @property
    def saved(self) -> settings_mod.Settings:
        """The settings file as written by `pink login` (warns if others can read it)."""
        if self._settings is None:
            self._settings = settings_mod.load(self.settings_path)
            if self._settings.token and settings_mod.insecure(self.settings_path):
                click.echo(f"warning: {self.settings_path} holds a token and is readable by "
                           f"others: chmod 600 it", err=True)
        return self._settings

    @property
    def settings(self) -> settings_mod.Settings:
        """Options and env vars over the saved settings."""
        return self.saved.merged(**self.overrides)

    def client(self) -> Client:
        if self._client is None:
            s = self.settings
            self._client = Client(s.url, s.token, _expand(s.ca))
        return self._client


def _expand(path: str) -> str:
    return os.path.expanduser(path) if path else ""


pass_cli = click.make_pass_decorator(CliContext)


class PinkGroup(click.Group):
    """A click group whose commands may raise PinkError: message on stderr, exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PinkError as exc:
            raise click.ClickException(exc.message) from None
