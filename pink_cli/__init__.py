"""The `pink` command line (entry point `pink = pink_cli:main`).

`main` is the click group: it takes the connection options once and hands
subcommands a `CliContext`. The commands live in `pink_cli.commands` (the
REST API, through `pink_cli.client.Client`), `pink_cli.accounts` (tokens),
`pink_cli.notify` (notifications) and
`pink_cli.admin` (users, through the API or on a server machine); settings
in `pink_cli.settings`.
"""

from __future__ import annotations

import click

from pink_cli.accounts import password, token
from pink_cli.admin import admin
from pink_cli.commands import COMMANDS
from pink_cli.context import CliContext, PinkGroup, connection_options
from pink_cli.notify import notify
from pink_cli.sweeps import sweep
from pink.version import version


@click.group(cls=PinkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@connection_options(envvars=True)
@click.version_option(version(), message="pink %(version)s")  # git's: pink/version.py
@click.pass_context
def main(ctx: click.Context, url, token, ca):
    """PINK is not Kubernetes: run your Docker images on the lab's GPU servers.

    Log in once with `pink login --url URL`; settings are saved in
    ~/.config/pink/config.toml (or $PINK_CLI_CONFIG).
    """
    ctx.obj = CliContext(url=url, token=token, ca=ca)


for _command in COMMANDS:
    main.add_command(_command)
main.add_command(token)
main.add_command(password)
main.add_command(admin)
main.add_command(sweep)
main.add_command(notify)
