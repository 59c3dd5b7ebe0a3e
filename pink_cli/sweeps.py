"""Sweeps from the command line: `pink submit --sweep/--sweep-file/--max-parallel`
builds the spec (`spec_from_options`); `pink sweep ID`, `pink sweep cancel ID` and
`pink sweep download ID -o DIR` show, cancel and download one (`GET/POST
/api/v1/sweeps/...`, `web.sweeps`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from pink.errors import PinkError
from pink.tasks import FINAL_NAMES
from pink_cli import output
from pink_cli.client import CONNECT_TIMEOUT, READ_TIMEOUT, Client, _save_stream
from pink_cli.context import CliContext, pass_cli

PAGE = 1000  # indexes read per request (the server's largest page)
# Done: final, or exported (the runner is done; the server counts those by their result).
FINAL = FINAL_NAMES | {"exported"}


# -- building a spec ----------------------------------------------------------------

def parse_axes(values: tuple[str, ...]) -> dict[str, list[str]]:
    """`--sweep LR=1e-3,1e-4 --sweep BS=32,64` -> {"LR": [...], "BS": [...]} (a grid)."""
    grid = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise click.BadParameter(f"{item!r} is not NAME=V1,V2,...", param_hint="--sweep")
        if key in grid:
            raise click.BadParameter(f"{key} is swept twice", param_hint="--sweep")
        grid[key] = text.split(",")
    return grid


def read_file(path: str) -> list[dict]:
    """A JSON list of env objects, or JSON lines of them, as the API's items."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise click.BadParameter(f"{path} is neither a JSON list nor JSON lines: {exc}",
                                     param_hint="--sweep-file") from None
    if not isinstance(data, list) or not all(isinstance(env, dict) for env in data):
        raise click.BadParameter(f"{path} must hold a list of objects of NAME: value", param_hint="--sweep-file")
    return [{"env": env} for env in data]


def spec_from_options(axes: tuple[str, ...], sweep_file: str | None, max_parallel: int | None) -> dict | None:
    """The sweep `pink submit` asks for, as the API reads it (None: a single task)."""
    if axes and sweep_file:
        raise click.UsageError("give --sweep or --sweep-file, not both")
    if not axes and not sweep_file:
        if max_parallel:
            raise click.UsageError("--max-parallel needs --sweep or --sweep-file")
        return None
    spec = {"grid": parse_axes(axes)} if axes else {"items": read_file(sweep_file)}
    if max_parallel:
        spec["max_parallel"] = max_parallel
    return spec


# -- the API -----------------------------------------------------------------------

def fetch(client: Client, sweep_id: str) -> dict:
    """The sweep with every index (page after page)."""
    sweep = client._json("GET", f"/sweeps/{sweep_id}", "sweep", params={"limit": PAGE})
    while len(sweep["indexes"]) < sweep["size"]:
        more = client._json("GET", f"/sweeps/{sweep_id}", "sweep",
                            params={"limit": PAGE, "offset": len(sweep["indexes"])})
        if not more["indexes"]:
            break
        sweep["indexes"] += more["indexes"]
    return sweep


def wait(client: Client, sweep_id: str, interval: float = 1.0) -> dict:
    """Poll until every index is final; returns the sweep."""
    last = None
    while True:
        sweep = client._json("GET", f"/sweeps/{sweep_id}", "sweep", params={"limit": 1})
        counts = sweep["counts"]
        if counts != last:
            click.echo(f"sweep {sweep_id}: {count_line(counts)}", err=True)
            last = counts
        if sum(counts.values()) >= sweep["size"] and set(counts) <= FINAL:
            return fetch(client, sweep_id)
        time.sleep(interval)


def download(client: Client, sweep_id: str, directory: str) -> Path:
    """Every output of the sweep as one tar (`sweep-<id>.tar`) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    target = Path(directory) / f"sweep-{sweep_id}.tar"
    part = target.with_name(target.name + ".part")
    resp = client._request("GET", f"/sweeps/{sweep_id}/outputs", stream=True,
                           timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    with resp:
        _save_stream(resp, part, 0, None, client._transport)
    os.replace(part, target)
    return target


def count_line(counts: dict) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "no indexes yet"


def summary(sweep: dict) -> str:
    head = f"sweep {sweep['id']}: {sweep['size']} indexes" + (
        f", at most {sweep['max_parallel']} at once" if sweep.get("max_parallel") else "")
    rows = [[i["index"], i["task"], i["state"], i["attempt"], i["exit_code"],
             " ".join(f"{k}={v}" for k, v in i["env"].items() if k != "PINK_SWEEP_INDEX")]
            for i in sweep["indexes"]]
    return "\n".join([head, count_line(sweep["counts"]), "",
                      output.table(["INDEX", "TASK", "STATE", "ATTEMPT", "EXIT", "ENV"], rows)])


def finish(sweep: dict) -> None:
    """Exit 1 unless every index succeeded."""
    failed = {s: n for s, n in sweep["counts"].items() if s != "succeeded"}
    if failed:
        raise PinkError(f"sweep {sweep['id']}: {count_line(failed)} of {sweep['size']} indexes did not succeed")


def after_submit(client: Client, task: dict, wait_all: bool, directory: str | None, as_json: bool) -> None:
    """What `pink submit` does once a sweep is created: print its id, and wait or download."""
    sweep_id = task["sweep"]["id"]
    click.echo(sweep_id)
    click.echo(f"sweep {sweep_id}: {task['sweep']['size']} indexes; `pink sweep {sweep_id}` shows them",
               err=True)
    if not (wait_all or directory):
        if as_json:
            click.echo(output.to_json(task))
        return
    sweep = wait(client, sweep_id)
    if directory:
        click.echo(f"saved outputs of sweep {sweep_id} to {download(client, sweep_id, directory)}", err=True)
    if as_json:
        click.echo(output.to_json(sweep))
    finish(sweep)


# -- commands ----------------------------------------------------------------------

class _SweepGroup(click.Group):
    """`pink sweep ID` shows a sweep; `pink sweep cancel|download ID` acts on it."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands:
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


@click.group(cls=_SweepGroup)
def sweep():
    """Show a sweep (`pink sweep ID`), cancel it or download all its outputs."""


@sweep.command("show", hidden=True)
@click.argument("sweep_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON.")
@pass_cli
def show(cli: CliContext, sweep_id, as_json):
    data = fetch(cli.client(), sweep_id)
    click.echo(output.to_json(data) if as_json else summary(data))


@sweep.command("cancel")
@click.argument("sweep_id", metavar="ID")
@pass_cli
def cancel(cli: CliContext, sweep_id):
    """Cancel every index not done running (`pink cancel TASK` cancels one)."""
    body = cli.client()._json("POST", f"/sweeps/{sweep_id}/cancel", expect=(202,))
    click.echo(f"sweep {sweep_id}: cancelling {len(body['cancelled'])} indexes", err=True)


@sweep.command("download")
@click.argument("sweep_id", metavar="ID")
@click.option("-o", "--output-dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory to save sweep-<ID>.tar in (one member per index's output).")
@pass_cli
def download_command(cli: CliContext, sweep_id, directory):
    """Download every index's output as one tar."""
    click.echo(f"saved {download(cli.client(), sweep_id, directory)}", err=True)
