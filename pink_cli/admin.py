"""`pink admin`: users (create, list, disable, enable, reset-password) and the schema.

`pink admin user ...` goes through the REST API as the logged-in admin, or,
with `--config` (or $PINK_CONFIG) on a server machine, straight to MariaDB:
that is how the first admin is made and the way back for an admin who lost
their password. Both paths run the same `pink.users` functions and print the
same answer. Generated passwords and tokens are printed once, never stored
in clear. Registered on the group by `pink_cli`.
"""

from __future__ import annotations

import click

from pink_cli import output
from pink_cli.context import CliContext, pass_cli

SHOWN_ONCE = "Keep these now: they are not stored in clear and cannot be shown again."


def _config_option(required: bool):
    text = ("The cluster's PINK config file (its [db] section)." if required else
            "Work on the database with this server config instead of through the API "
            "(on a server machine: the first admin, a lost admin password).")
    return click.option("--config", "config_path", envvar="PINK_CONFIG", show_envvar=True, required=required,
                        type=click.Path(dir_okay=False), help=text)


def _load(config_path: str):
    from pink import config  # the server-side modules are needed only here

    return config.load(config_path)


def _direct(config_path: str, work):
    """Run `work(conn)` on the database the server config names."""
    config = _load(config_path)
    from pink import users  # after the config: a bad --config needs no database driver

    with users.database(config) as conn:
        return work(users, conn)


def _show(answer: dict, as_json: bool) -> None:
    if as_json:
        click.echo(output.to_json(answer))
        return
    user = answer["user"]
    state = "disabled" if user.get("disabled") else "active"
    click.echo(f"user:     {user['name']}{' (admin)' if user.get('admin') else ''}, {state}")
    for secret in ("password", "token"):
        if answer.get(secret):
            click.echo(f"{secret + ':':<9} {answer[secret]}")
    if answer.get("password") or answer.get("token"):
        click.echo(SHOWN_ONCE, err=True)


@click.group()
def admin():
    """Manage users and the database schema (admins)."""


@admin.group()
def user():
    """Create, list, disable, enable users and reset passwords."""


@user.command("create")
@click.argument("name")
@click.option("--admin", "is_admin", is_flag=True, help="Let the user see and manage every task.")
@click.option("--json", "as_json", is_flag=True, help="Print the user, password (and token) as JSON.")
@_config_option(required=False)
@pass_cli
def create(cli: CliContext, name, is_admin, as_json, config_path):
    """Create user NAME with a generated password (with --config, also a first API token)."""
    if config_path:
        from pink import users

        answer = users.create_user(_load(config_path), name, admin=is_admin)
    else:
        answer = cli.client().create_user(name, is_admin)
    _show(answer, as_json)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the users as JSON.")
@_config_option(required=False)
@pass_cli
def list_(cli: CliContext, as_json, config_path):
    """Every user: admin, state, created, last used."""
    if config_path:
        found = _direct(config_path, _all_users)
    else:
        found = list(cli.client().users())
    click.echo(output.to_json(found) if as_json else output.users_table(found))


def _all_users(users, conn) -> list[dict]:
    found, after = [], ""
    while after is not None:
        page, after = users.list_users(conn, after)
        found += [users.user_view(u) for u in page]
    return found


def _user_action(action: str, help_text: str) -> click.Command:
    """Register `pink admin user ACTION NAME [--json] [--config]`.

    disable, enable and reset-password are the same request but for the
    action (the API's user action, or `pink.users.change` with --config), so
    one command body serves all three and they cannot drift apart.
    """

    @user.command(action, help=help_text)
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
    @_config_option(required=False)
    @pass_cli
    def change(cli: CliContext, name, as_json, config_path):
        if config_path:
            answer = _direct(config_path, lambda users, conn: users.change(conn, name, action))
        else:
            answer = cli.client().user_action(name, action)
        _show(answer, as_json)

    return change


disable = _user_action("disable", "Disable NAME: no login, and none of their tokens work, until `enable`.")
enable = _user_action("enable", "Let NAME log in and use their tokens again.")
reset_password = _user_action("reset-password",
                              "Give NAME a new generated password (printed once); the old one stops working.")


@admin.command("migrate")
@_config_option(required=True)
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
