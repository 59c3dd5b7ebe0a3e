"""`pink notify`: where PINK tells you a task ended (a signed webhook, e-mail),
through the REST API (`/api/v1/me/notifications`).

The webhook's signing secret is made by PINK when you first set one; `show`
prints it (you need it to check signatures: README, "Notifications"),
`rotate-secret` replaces it. Registered on the group by `pink_cli`.
"""

from __future__ import annotations

import click

from pink_cli import output
from pink_cli.context import CliContext, pass_cli


@click.group()
def notify():
    """Notifications when your tasks end: a signed webhook and/or e-mail."""


def _show(settings: dict, as_json: bool) -> None:
    if as_json:
        click.echo(output.to_json(settings))
        return
    email = settings.get("email") or "-"
    if not settings.get("email_enabled"):
        email += " (this PINK sends no e-mail)"
    for label, value in (("webhook", settings.get("webhook") or "-"), ("email", email),
                         ("on running", "yes" if settings.get("on_running") else "no"),
                         ("secret", settings.get("secret") or "-")):
        click.echo(f"{label + ':':<12}{value}")


@notify.command("set")
@click.option("--webhook", metavar="URL", help="POST a signed JSON payload here when a task ends.")
@click.option("--email", metavar="ADDRESS", help="Also e-mail this address (through the lab's relay).")
@click.option("--on-running/--no-on-running", default=None, help="Also notify when a task starts running.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@pass_cli
def set_(cli: CliContext, webhook, email, on_running, as_json):
    """Set your webhook, e-mail and whether `running` is told; what you leave out is kept.

    Tasks submitted from now on are notified. An empty value ("") clears one."""
    changes = {}
    if webhook is not None:
        changes["webhook"] = webhook or None
    if email is not None:
        changes["email"] = email or None
    if on_running is not None:
        changes["on_running"] = on_running
    if not changes:
        raise click.UsageError("nothing to set: give --webhook, --email or --on-running")
    _show(cli.client().set_notifications(**changes), as_json)


@notify.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@pass_cli
def show(cli: CliContext, as_json):
    """Your webhook, e-mail, on-running flag and signing secret."""
    _show(cli.client().notifications(), as_json)


@notify.command("clear")
@pass_cli
def clear(cli: CliContext):
    """Forget your webhook, e-mail and secret (tasks submitted from now on notify nobody)."""
    cli.client().clear_notifications()
    click.echo("notifications cleared", err=True)


@notify.command("rotate-secret")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@pass_cli
def rotate_secret(cli: CliContext, as_json):
    """Replace your signing secret; deliveries are signed with the new one from now on."""
    _show(cli.client().rotate_notification_secret(), as_json)
