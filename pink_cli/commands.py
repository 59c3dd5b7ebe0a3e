"""The user's `pink` commands: login, submit, status, usage, logs, download, cancel, nodes.

Each is a thin wrapper: arguments are validated here (usage errors exit 2),
the work is done by `pink_cli.client.Client` and `pink_cli.images`, and the
text comes from `pink_cli.output`. Data goes to stdout, messages and
progress bars to stderr. Registered on the group by `pink_cli`.
"""

from __future__ import annotations

import os
import re

import click

from pink import units
from pink.errors import PinkError
from pink.tasks import OUTPUTS, State
from pink_cli import images, output, sweeps
from pink_cli import settings as settings_mod
from pink_cli.client import Client, normalize_url
from pink_cli.context import CliContext, connection_options, pass_cli

ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION = re.compile(r"(\d+)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _err(message: str) -> None:
    click.echo(message, err=True)


# -- argument parsing ----------------------------------------------------------

def parse_env(ctx, param, values) -> dict[str, str]:
    """`--env K=V` (repeatable) -> {K: V}; the value may be empty or contain `=`."""
    env = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        if not ENV_KEY.fullmatch(key):
            raise click.BadParameter(f"{key!r} is not a valid variable name "
                                     f"(letters, digits, _; not starting with a digit)", ctx, param)
        env[key] = value
    return env


def parse_duration(text: str) -> int:
    """`90`, `90s`, `30m`, `2h`, `1d` or `1h30m` -> seconds."""
    compact = text.strip().lower().replace(" ", "")
    pos, total = 0, 0
    for match in _DURATION.finditer(compact):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact) or total <= 0:
        raise ValueError(f"{text!r} is not a duration like 600, 90s, 30m, 2h or 1h30m")
    return total


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def check_output(ctx, param, value):
    if value and value not in OUTPUTS and not value.startswith("/"):
        raise click.BadParameter("must be 'full', 'changes' or an absolute path inside the container",
                                 ctx, param)
    return value


# -- login -------------------------------------------------------------------------

@click.command()
@connection_options(envvars=False)
@click.option("--username", "-u", help="Log in with this user's password (prompted) to get a token.")
@click.option("--password", envvar="PINK_PASSWORD", hidden=True,
              help="The password, for scripts (prefer the hidden prompt).")
@pass_cli
def login(cli: CliContext, url, token, ca, username, password):
    """Check credentials against a server and save them for the next commands."""
    if token and username:
        raise click.UsageError("give either --token or --username, not both")
    s = cli.saved.merged(**cli.overrides).merged(url=url, token=token, ca=ca)
    if not s.url:
        raise click.UsageError("which server? pass --url URL (or set PINK_URL)")
    ca_path = os.path.abspath(os.path.expanduser(s.ca)) if s.ca else ""
    token = token or cli.overrides.get("token")
    if not token and not username:
        username = click.prompt("Username", err=True)
    client = Client(s.url, None if username else token, ca_path)
    # a device cookie belongs to the server that gave it: never sent to, or kept for, another
    device = s.device if normalize_url(cli.saved.url or "") == normalize_url(s.url) else ""
    if username:
        if password is None:
            password = click.prompt("Password", hide_input=True, err=True)
        user = client.login(username, password, device=device).get("user") or {}
        who = f"{user.get('name', username)}{' (admin)' if user.get('admin') else ''}"
    else:
        client.check_token()
        who = "token accepted"
    device = client.device if username else device
    path = settings_mod.save(settings_mod.Settings(url=normalize_url(s.url), token=client.token,
                                                   ca=ca_path, device=device), cli.settings_path)
    _err(f"logged in to {client.url}: {who}; saved to {path}")


# -- submit ------------------------------------------------------------------------

@click.command()
@click.argument("source", metavar="FILE.tar|IMAGE[:TAG]")
@click.option("--name", help="A name to recognise the task by (default: its id).")
@click.option("--gpus", type=click.IntRange(min=0), help="Number of GPUs to reserve.  [default: 0]")
@click.option("--timeout", type=Duration(), help="Longest run time, e.g. 600, 30m, 2h.  [default: 24h]")
@click.option("--env", "-e", "env", multiple=True, callback=parse_env, metavar="KEY=VALUE",
              help="Environment variable for the container (repeatable).")
@click.option("--cmd", help="Command, as shell words (replaces the image's CMD).")
@click.option("--entrypoint", help="Entrypoint, as shell words (replaces the image's ENTRYPOINT).")
@click.option("--output", "output_path", callback=check_output, metavar="full|changes|PATH",
              help="What to return: the whole filesystem, only the files the task added or changed "
                   "(with a manifest of those and of deleted paths), or one path.  [default: full]")
@click.option("--gzip", is_flag=True, help="Compress the output with gzip instead of zstd.")
@click.option("--wait", is_flag=True, help="Wait for the task to finish; exit 1 unless it succeeded.")
@click.option("--download", type=click.Path(file_okay=False), metavar="DIR",
              help="Wait, then download the output into DIR (implies --wait).")
@click.option("--notify", metavar="URL", help="Send this task's signed webhook here instead of to yours "
              "(`pink notify`).")
@click.option("--notify-running/--no-notify-running", default=None,
              help="Also notify when the task starts running.  [default: your setting]")
@click.option("--sweep", "axes", multiple=True, metavar="NAME=V1,V2,...",
              help="Run one task per value (repeatable: every combination); prints the sweep id.")
@click.option("--sweep-file", type=click.Path(exists=True, dir_okay=False),
              help="Run one task per env set in this file (a JSON list of objects, or JSON lines).")
@click.option("--max-parallel", type=click.IntRange(min=1), metavar="N",
              help="At most N indexes of the sweep running at once (Slurm's %N).")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
@pass_cli
def submit(cli: CliContext, source, name, gpus, timeout, env, cmd, entrypoint, output_path,
           gzip, wait, download, notify, notify_running, axes, sweep_file, max_parallel, as_json):
    """Run a `docker save` archive, or a local Docker image, on the GPU servers.

    Prints the task id (or the task as JSON with --json) on stdout.
    """
    client = cli.client()
    sweep = sweeps.spec_from_options(axes, sweep_file, max_parallel)

    def saving(image, size):
        _err(f"no file {source}: saving local Docker image {image} ({units.size(size)}) "
             f"to a temporary file")

    with images.archive_for(source, on_saving=saving, progress=output.ProgressBar("saving")) as path:
        def plan(sending: int, layers: int, size: int) -> None:
            if sending < layers:
                _err(f"{layers - sending} of {layers} layers are already on the server; "
                     f"sending {sending} ({units.size(size)})")

        with output.ProgressBar("uploading") as bar:
            task = client.submit(path, name=name, cmd=cmd, entrypoint=entrypoint, env=env, gpus=gpus,
                                 timeout=timeout, output=output_path,
                                 compression="gzip" if gzip else None, progress=bar, on_plan=plan,
                                 notify=notify, notify_running=notify_running, sweep=sweep)
    if task.get("sweep"):
        return sweeps.after_submit(client, task, wait, download, as_json)
    if not as_json:
        click.echo(task["id"])
    if not (wait or download):
        if as_json:
            click.echo(output.to_json(task))
        return
    task = client.wait(task["id"], on_change=lambda t: _err(output.state_line(t)))
    if download:
        fetch_output(client, task, directory=download)
    if as_json:
        click.echo(output.to_json(task))
    finish(task)


def fetch_output(client: Client, task: dict, directory: str | None = None, dest: str | None = None):
    if not task.get("output"):
        _err(f"task {task['id']} has no output to download")
        return None
    if directory:
        os.makedirs(directory, exist_ok=True)
    with output.ProgressBar("downloading") as bar:
        path = client.download(task["id"], dest=dest, directory=directory or ".", progress=bar)
    _err(f"saved output of task {task['id']} to {path}")
    return path


def finish(task: dict) -> None:
    """Exit 1, with the reason, when a waited-for task did not succeed."""
    if task.get("state") != "succeeded":
        reason = f"task {task['id']} ended {task.get('state')}"
        if task.get("exit_code") is not None:
            reason += f" (exit code {task['exit_code']})"
        if task.get("error"):
            reason += f": {task['error']}"
        if failure := task.get("failure"):
            reason += f"\n{output.failure_line(failure)}. {failure.get('advice') or ''}".rstrip()
        raise PinkError(reason)


# -- looking at tasks --------------------------------------------------------------------

@click.command()
@click.argument("task_id", metavar="[ID]", required=False)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True,
              help="Tasks per page (the newest page is shown unless --all).")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only tasks in this state.")
@click.option("--name", help="Only tasks whose name contains this.")
@click.option("--since", help="Only tasks submitted at or after this date/time (ISO 8601).")
@click.option("--until", help="Only tasks submitted before this date/time (ISO 8601).")
@click.option("--user", help="Only this user's tasks (admins).")
@click.option("--all", "every", is_flag=True, help="Page through every matching task.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of tasks, or one task).")
@pass_cli
def status(cli: CliContext, task_id, limit, state, name, since, until, user, every, as_json):
    """List your tasks, newest first, or show one task in detail."""
    client = cli.client()
    if task_id:
        task = client.get(task_id)
        click.echo(output.to_json(task) if as_json else output.task_details(task))
        return
    filters = {"limit": limit, "state": state, "name": name, "since": since, "until": until, "user": user}
    if every:
        tasks, more = list(client.list(**filters)), None
    else:
        tasks, more = client.page(**filters)
    click.echo(output.to_json(tasks) if as_json else output.tasks_table(tasks))
    if more and not as_json:
        _err(f"(the newest {len(tasks)}; --all shows every task, --limit N up to 500 per page)")


@click.command()
@click.option("--since", help="From this date/time (ISO 8601), by when tasks finished.")
@click.option("--until", help="Up to (not including) this date/time.")
@click.option("--user", help="Only this user (admins; others see only themselves).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_cli
def usage(cli: CliContext, since, until, user, as_json):
    """Finished tasks, GPU-hours and wall-hours per user, from the archive; then
    each per-user limit, your use of it (or --user's) and what it caps."""
    body = cli.client().usage(since=since, until=until, user=user)
    if as_json:  # the rows alone, as before limits were shown (GET /api/v1/usage has them)
        click.echo(output.to_json(body.get("usage") or []))
        return
    click.echo(output.usage_table(body.get("usage") or []))
    if body.get("limits"):
        click.echo("\n" + output.limits_table(body["limits"]))


@click.command()
@click.argument("task_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task ends.")
@pass_cli
def logs(cli: CliContext, task_id, follow):
    """Print a task's output log (stdout and stderr of its container)."""
    out = click.get_binary_stream("stdout")
    for chunk in cli.client().logs(task_id, follow=follow):
        out.write(chunk)
        out.flush()


@click.command()
@click.argument("task_id", metavar="ID")
@click.option("--output", "-o", "dest", type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to save it.  [default: ./ID.tar.zst, the server's file name]")
@pass_cli
def download(cli: CliContext, task_id, dest):
    """Download a task's output filesystem, resuming an interrupted download.

    Prints the saved file's path on stdout.
    """
    with output.ProgressBar("downloading") as bar:
        path = cli.client().download(task_id, dest=dest, progress=bar)
    click.echo(str(path))


@click.command()
@click.argument("task_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@pass_cli
def cancel(cli: CliContext, task_id, yes, as_json):
    """Cancel a live task, or delete a finished one and its output."""
    if not yes:
        click.confirm(f"Cancel task {task_id} (or delete it and its output if it has finished)?",
                      abort=True, err=True)
    answer = cli.client().cancel(task_id)
    if as_json:
        click.echo(output.to_json(answer))
    elif "deleted" in answer:
        _err(f"task {task_id} deleted")
    else:
        state = (answer.get("task") or {}).get("state")
        _err(f"cancel requested for task {task_id}" + (f" (now {state})" if state else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the nodes as JSON.")
@pass_cli
def nodes(cli: CliContext, as_json):
    """List the GPU servers (runners) and what they are running."""
    found = cli.client().nodes()
    click.echo(output.to_json(found) if as_json else output.nodes_table(found))


@click.group()
def node():
    """Take a runner out of service and back (admins)."""


def _node_action(cli: CliContext, name: str, action: str, now: bool, as_json: bool) -> None:
    result = cli.client().node_action(name, action, now=now)
    if as_json:
        click.echo(output.to_json(result))
        return
    moved = f"; {result['moved']} waiting task(s) moved elsewhere" if result.get("moved") else ""
    click.echo(f"node {name}: {result['node']['state']}{moved}", err=True)


def _node_command(*options, json_help: str = "Print the node as JSON."):
    """Register the decorated function as `pink node COMMAND NAME [OPTIONS] [--json]`.

    Every node command acts on one runner NAME and can print the server's
    answer as JSON; `options` are its own options, listed between the two.
    """

    def register(func):
        func = click.option("--json", "as_json", is_flag=True, help=json_help)(pass_cli(func))
        for option in reversed(options):
            func = option(func)
        return node.command()(click.argument("name")(func))

    return register


@_node_command(click.option("--now", is_flag=True, help="Also move tasks waiting there to other runners."))
def drain(cli: CliContext, name, now, as_json):
    """No new tasks on NAME; tasks placed there finish (with --now only running ones)."""
    _node_action(cli, name, "drain", now, as_json)


@_node_command(click.option("--yes", is_flag=True, help="Do not ask for confirmation."))
def stop(cli: CliContext, name, yes, as_json):
    """Stop the tasks running on NAME (SIGTERM, grace, SIGKILL) and run them elsewhere."""
    if not yes:
        click.confirm(f"Stop every task running on {name} and re-queue them?", abort=True, err=True)
    _node_action(cli, name, "stop", False, as_json)


@_node_command()
def resume(cli: CliContext, name, as_json):
    """Let NAME take tasks again."""
    _node_action(cli, name, "resume", False, as_json)


@_node_command(json_help="Print the keys removed as JSON.")
def forget(cli: CliContext, name, as_json):
    """Forget NAME, a runner gone for good (removed or replaced): its drain or
    stop and what else etcd keeps of it. Refused while it is up."""
    keys = cli.client().forget_node(name)
    click.echo(output.to_json(keys) if as_json else f"node {name}: forgotten ({len(keys)} key(s) removed)",
               err=not as_json)


COMMANDS = [login, submit, status, usage, logs, download, cancel, nodes, node]
