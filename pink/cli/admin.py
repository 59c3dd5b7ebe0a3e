"""`pink admin`: server-side account management, run where the config is.

These commands talk to MariaDB through `pink.users` with the cluster's own
config file (`--config` or $PINK_CONFIG), not to the REST API, so they work
before any user exists. Secrets they create are printed once, never stored
in clear. Registered on the group by `pink.cli`.
"""

from __future__ import annotations

import click

from pink.cli.output import to_json

_config_option = click.option(
    "--config", "config_path", envvar="PINK_CONFIG", show_envvar=True, required=True,
    type=click.Path(dir_okay=False), help="The cluster's PINK config file (its [db] section).")

SHOWN_ONCE = "Keep these now: they are not stored in clear and cannot be shown again."


def _load(config_path: str):
    from pink import config  # the server-side modules are needed only here

    return config.load(config_path)


@click.group()
def admin():
    """Manage users, tokens and the database schema (on a server machine, with its config file)."""


@admin.command("create-user")
@click.argument("name")
@click.option("--admin", "is_admin", is_flag=True, help="Let the user see and manage every task.")
@click.option("--json", "as_json", is_flag=True, help="Print name, password, token and admin as JSON.")
@_config_option
def create_user(name, is_admin, as_json, config_path):
    """Create user NAME with a generated password and a first API token."""
    config = _load(config_path)
    from pink import users  # after the config: a bad --config needs no database driver

    created = users.create_user(config, name, admin=is_admin)
    if as_json:
        click.echo(to_json(created))
    else:
        click.echo(f"user:     {created['name']}{' (admin)' if created.get('admin') else ''}")
        click.echo(f"password: {created['password']}")
        click.echo(f"token:    {created['token']}")
    click.echo(SHOWN_ONCE, err=True)


@admin.command("create-token")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print {\"name\", \"token\"} as JSON.")
@_config_option
def create_token(name, as_json, config_path):
    """Create another API token for the existing user NAME."""
    config = _load(config_path)
    from pink import users

    token = users.create_token(config, name)
    click.echo(to_json({"name": name, "token": token}) if as_json else token)
    click.echo("Keep this token now: it is not stored in clear and cannot be shown again.", err=True)


@admin.command("migrate")
@_config_option
def migrate(config_path):
    """Upgrade the database schema in place (web nodes and workers also do it at start)."""
    config = _load(config_path)
    from pink import db

    conn = db.connect(config.db)
    try:
        before, after = db.migrate(conn)
    finally:
        conn.close()
    click.echo(f"schema version {after}" + (f" (upgraded from {before})" if before != after else
                                            " (already current)"))
