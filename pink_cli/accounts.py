"""`pink token` (a user's own API tokens: create, list, revoke) and `pink password`,
through the REST API.

Each laptop, notebook or script gets its own named token that expires, so
one can be revoked without logging out everywhere. The secret is printed
once, on stdout (so it can be piped); the server keeps only its hash.
Registered on the group by `pink_cli`.
"""

from __future__ import annotations

import click

from pink_cli import output
from pink_cli.context import CliContext, pass_cli


@click.group()
def token():
    """Your API tokens: create one per machine or script, revoke what you no longer use."""


@token.command("create")
@click.argument("name")
@click.option("--days", type=click.IntRange(1, 3660), default=90, show_default=True,
              help="Days until it expires.")
@click.option("--no-expiry", is_flag=True, help="Valid until revoked (for a service you watch).")
@click.option("--scope", type=click.Choice(["user", "metrics"]), default="user", show_default=True,
              help="user: the API as you; metrics: only GET /metrics (admins, for Prometheus).")
@click.option("--json", "as_json", is_flag=True, help="Print the token and its secret as JSON.")
@pass_cli
def create(cli: CliContext, name, days, no_expiry, scope, as_json):
    """Create a token called NAME and print its secret (shown only now)."""
    created = cli.client().create_token(name, None if no_expiry else days, scope)
    if as_json:
        click.echo(output.to_json(created))
    else:
        click.echo(created["secret"])
        expires = created["token"].get("expires_at") or "never"
        click.echo(f"token {created['token']['id']} ({name}, {scope}) expires {expires}; "
                   "keep the secret now: it cannot be shown again", err=True)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON.")
@pass_cli
def list_(cli: CliContext, as_json):
    """Your tokens: name, scope, created, last used, expiry."""
    tokens = cli.client().tokens()
    click.echo(output.to_json(tokens) if as_json else output.tokens_table(tokens))


@token.command("revoke")
@click.argument("token_id", type=int)
@pass_cli
def revoke(cli: CliContext, token_id):
    """Revoke your token TOKEN_ID (see `pink token list`); it stops working at once."""
    cli.client().revoke_token(token_id)
    click.echo(f"token {token_id} revoked", err=True)


@click.command()
@pass_cli
def password(cli: CliContext):
    """Change your password (prompted). Your tokens keep working; browser sessions end."""
    current = click.prompt("Current password", hide_input=True, err=True)
    new = click.prompt("New password (12 characters or more)", hide_input=True, confirmation_prompt=True,
                       err=True)
    cli.client().change_password(current, new)
    click.echo("password changed", err=True)
