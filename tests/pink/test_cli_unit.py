"""The `pink` CLI's parts that need no server: settings file, option and env
precedence, argument validation, error translation, output formatting.

The CLI against real services is tested end to end elsewhere; here nothing
pretends to be a server (a closed port is a real connection failure).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import tarfile
from datetime import datetime, timezone

import pytest
import requests
from click.testing import CliRunner

from pink import errors, units
from pink_cli import main
from pink_cli import client as client_mod
from pink_cli import commands, images, output, settings
from pink_cli.client import Client, ProgressFile
from pink_cli.context import CliContext


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Each test gets its own settings file and none of the caller's PINK_* env."""
    for name in ("PINK_URL", "PINK_TOKEN", "PINK_CA", "PINK_CONFIG", "PINK_PASSWORD", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "conf" / "pink" / "config.toml"
    monkeypatch.setenv("PINK_CLI_CONFIG", str(path))
    # retries of a closed port without waits (tests/security/test_cli_retries.py waits the shipped ones)
    monkeypatch.setattr(client_mod, "BACKOFF", 0.0)
    return path


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def closed_url():
    """A local URL nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- settings file ---------------------------------------------------------------

def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PINK_CLI_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert settings.default_path() == tmp_path / "xdg" / "pink" / "config.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.default_path() == tmp_path / "home" / ".config" / "pink" / "config.toml"


def test_pink_cli_config_overrides_path(clean_env):
    assert settings.default_path() == clean_env


def test_missing_file_is_empty_settings(clean_env):
    assert settings.load() == settings.Settings()


def test_save_then_load_round_trips_awkward_values(clean_env):
    s = settings.Settings(url="https://pink.lab:8443", token='a"b\\c\nd\te\x01f\x7fé☃',
                          ca="/path with space/ca.pem")
    settings.save(s)
    assert settings.load() == s


def test_save_is_private(clean_env):
    settings.save(settings.Settings(url="https://x", token="secret"))
    assert stat.S_IMODE(os.stat(clean_env).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(clean_env.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(clean_env.parent.parent).st_mode) == 0o700
    assert not settings.insecure(clean_env)


def test_save_replaces_a_loose_file_with_a_private_one(clean_env):
    clean_env.parent.mkdir(parents=True)
    clean_env.write_text('token = "old"\n')
    os.chmod(clean_env, 0o644)
    assert settings.insecure(clean_env)
    settings.save(settings.Settings(token="new"))
    assert stat.S_IMODE(os.stat(clean_env).st_mode) == 0o600
    assert settings.load().token == "new"
    assert [p.name for p in clean_env.parent.iterdir()] == ["config.toml"]  # no temp left


def test_invalid_toml_is_a_config_error(clean_env):
    clean_env.parent.mkdir(parents=True)
    clean_env.write_text("url = \n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        settings.load()


def test_non_string_value_is_a_config_error(clean_env):
    clean_env.parent.mkdir(parents=True)
    clean_env.write_text("url = 5\n")
    with pytest.raises(errors.ConfigError, match="url must be a string"):
        settings.load()


def test_overrides_win_only_when_set():
    s = settings.Settings(url="file-url", token="file-token", ca="file-ca")
    merged = s.merged(url="opt-url", token=None, ca="")
    assert merged == settings.Settings(url="opt-url", token="file-token", ca="file-ca")


def test_context_prefers_env_and_options_over_file(monkeypatch, clean_env, runner, closed_url):
    settings.save(settings.Settings(url="http://file.invalid", token="t-file"))
    assert CliContext().settings.url == "http://file.invalid"
    monkeypatch.setenv("PINK_URL", closed_url)
    result = runner.invoke(main, ["status"])
    assert result.exit_code == 1
    assert closed_url in result.stderr  # env beat the file
    result = runner.invoke(main, ["--url", closed_url + "/", "status"], env={"PINK_URL": "http://env.invalid"})
    assert closed_url in result.stderr and "env.invalid" not in result.stderr  # option beat env


def test_loose_settings_file_warns(clean_env, runner, closed_url):
    settings.save(settings.Settings(url=closed_url, token="t"))
    os.chmod(clean_env, 0o644)
    result = runner.invoke(main, ["status"])
    assert "readable by others" in result.stderr


# -- client pieces ---------------------------------------------------------------------

def test_normalize_url():
    assert client_mod.normalize_url("pink.lab:8443/") == "https://pink.lab:8443"
    assert client_mod.normalize_url(" http://x/ ") == "http://x"


def test_client_needs_url_and_existing_ca(tmp_path):
    with pytest.raises(errors.ConfigError, match="no server URL"):
        Client("")
    with pytest.raises(errors.ConfigError, match="does not exist"):
        Client("https://x", "t", str(tmp_path / "missing.pem"))


def test_refused_connection_names_the_url(closed_url):
    with pytest.raises(errors.Unavailable, match=f"cannot reach the PINK server at {closed_url}"):
        Client(closed_url, "t").page()


def _response(status: int, body: bytes, ctype="application/json") -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body
    resp.headers["Content-Type"] = ctype
    resp.reason = "Reason"
    return resp


def test_transient_answers_are_retried_and_others_taken():
    """502/503/504 wait a jittered backoff (or Retry-After); 429 only with Retry-After."""
    for status in (502, 503, 504):
        assert client_mod._retry_wait(_response(status, b"{}"), 1) is not None
    assert client_mod._retry_wait(_response(429, b"{}"), 1) is None
    limited = _response(429, b"{}")
    limited.headers["Retry-After"] = "3"
    assert client_mod._retry_wait(limited, 1) == 3.0
    limited.headers["Retry-After"] = "3600"  # longer than a CLI should sit silent
    assert client_mod._retry_wait(limited, 1) is None
    for status in (400, 404, 409, 500):
        assert client_mod._retry_wait(_response(status, b"{}"), 1) is None
    assert not client_mod._retryable(requests.exceptions.SSLError("bad cert"), True)
    assert not client_mod._retryable(requests.exceptions.ConnectionError("reset"), False)
    assert client_mod._retryable(requests.exceptions.ConnectionError("reset"), True)


def test_backoff_grows_with_jitter_and_is_capped(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF", 0.5)
    waits = [client_mod._backoff(n) for n in range(1, 10)]
    assert 0.25 <= waits[0] <= 0.5 and 1.0 <= waits[2] <= 2.0
    assert all(w <= client_mod.MAX_BACKOFF for w in waits)


def test_server_error_becomes_matching_pink_error():
    err = client_mod.error_from_response(_response(404, b'{"error": "not_found", "message": "no task x"}'))
    assert isinstance(err, errors.NotFound)
    assert (err.message, err.code, err.status) == ("no task x", "not_found", 404)
    err = client_mod.error_from_response(_response(409, b'{"error": "no_output", "message": "not yet"}'))
    assert isinstance(err, errors.Conflict) and err.code == "no_output"
    err = client_mod.error_from_response(_response(500, b"<html>oops</html>", "text/html"))
    assert type(err) is errors.PinkError and "500" in err.message


def test_401_tells_user_to_log_in_except_at_login():
    body = b'{"error": "unauthorized", "message": "bad password"}'
    assert client_mod.error_from_response(_response(401, body)).message == client_mod.NOT_LOGGED_IN
    assert client_mod.error_from_response(_response(401, body), auth_hint=False).message == "bad password"


@pytest.mark.parametrize("header, name", [
    ('attachment; filename="abc.tar.zst"', "abc.tar.zst"),
    ("attachment; filename=abc.tar.gz", "abc.tar.gz"),
    ("attachment; filename*=UTF-8''a%20b.tar.zst", "a b.tar.zst"),
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ('attachment; filename=".."', None),
    ("attachment", None),
    (None, None),
])
def test_filename_from_disposition(header, name):
    assert client_mod.filename_from_disposition(header) == name


def test_submit_params_only_what_was_set():
    params = client_mod.submit_params(name="n", cmd="sh -c 'echo hi'", env={"A": "1", "B": "x=y"},
                                      gpus=0, timeout=None, output=None, compression="gzip")
    assert params == [("name", "n"), ("cmd", "sh -c 'echo hi'"), ("gpus", "0"),
                      ("compression", "gzip"), ("env", "A=1"), ("env", "B=x=y")]
    assert client_mod.submit_params(env=["K=V"]) == [("env", "K=V")]


def test_progress_file_rewinds_for_a_retry(tmp_path):
    path = tmp_path / "body"
    path.write_bytes(b"abcdef")
    seen = []
    with ProgressFile(path, lambda done, total: seen.append(done)) as body:
        assert body.read() == b"abcdef"
        body.rewind()
        assert body.read() == b"abcdef" and seen == [6, 6]


def test_progress_file_sends_content_length_and_reports(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"x" * 2500)
    seen = []
    with ProgressFile(path, lambda done, total: seen.append((done, total))) as body:
        prepared = requests.Request("POST", "http://h/api/v1/tasks", data=body).prepare()
        assert prepared.headers["Content-Length"] == "2500"
        assert "Transfer-Encoding" not in prepared.headers
        assert body.read(1000) == b"x" * 1000
        assert len(body.read()) == 1500
        assert body.read(10) == b""
    assert seen == [(1000, 2500), (2500, 2500)]


@pytest.mark.parametrize("bad", ["", "..", "a/b", "x?y", "a b"])
def test_task_ids_cannot_change_the_path(bad):
    with pytest.raises(errors.BadRequest):
        client_mod._id(bad)


# -- argument parsing ------------------------------------------------------------------

def test_parse_env_accepts_empty_and_equals_in_value():
    assert commands.parse_env(None, None, ["A=1", "B=", "C=x=y", "_d9=z"]) == \
        {"A": "1", "B": "", "C": "x=y", "_d9": "z"}


@pytest.mark.parametrize("bad", ["NOEQUALS", "=v", "1A=2", "A-B=1", "A B=1"])
def test_bad_env_is_a_usage_error(runner, tmp_path, bad):
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    result = runner.invoke(main, ["submit", str(archive), "--env", bad])
    assert result.exit_code == 2
    assert "--env" in result.stderr


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                           ("1d", 86400), ("1h30m", 5400), ("1H 30M", 5400)])
def test_parse_duration(text, seconds):
    assert commands.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-5", "1x", "h", "1.5h", "m30"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        commands.parse_duration(bad)


@pytest.mark.parametrize("args", [["--timeout", "soon"], ["--gpus", "-1"], ["--output", "rel/path"]])
def test_bad_submit_options_are_usage_errors(runner, tmp_path, args):
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    result = runner.invoke(main, ["submit", str(archive), *args])
    assert result.exit_code == 2, result.output


def test_submit_without_server_fails_cleanly(runner, tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    result = runner.invoke(main, ["submit", str(archive)])
    assert result.exit_code == 1
    assert "no server URL" in result.stderr and result.stdout == ""


def _tiny_archive(path) -> str:
    """A valid one-layer `docker save` archive, written without Docker."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    layer_bytes = layer.getvalue()
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": [f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"]}}).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["tiny:1"], "Layers": ["l/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in ((config_name, config), ("l/layer.tar", layer_bytes), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_submit_to_unreachable_server_exits_1(runner, tmp_path, closed_url):
    archive = tmp_path / "a.tar"
    _tiny_archive(archive)
    result = runner.invoke(main, ["--url", closed_url, "--token", "t", "submit", str(archive)])
    assert result.exit_code == 1
    assert f"cannot reach the PINK server at {closed_url}" in result.stderr
    assert archive.exists()  # a file given by the user is never deleted


def test_login_argument_errors(runner):
    result = runner.invoke(main, ["login", "--token", "t", "--username", "u"])
    assert result.exit_code == 2 and "not both" in result.stderr
    result = runner.invoke(main, ["login", "--token", "t"])
    assert result.exit_code == 2 and "--url" in result.stderr


def test_failed_login_saves_nothing(runner, clean_env, closed_url):
    result = runner.invoke(main, ["login", "--url", closed_url, "--token", "t"])
    assert result.exit_code == 1
    assert not clean_env.exists()


def test_cancel_confirms_before_anything(runner, closed_url):
    result = runner.invoke(main, ["--url", closed_url, "cancel", "abc"], input="n\n")
    assert result.exit_code == 1
    assert "Cancel task abc" in result.stderr and "cannot reach" not in result.stderr


def test_admin_user_goes_to_the_api_or_the_config(clean_env, runner, tmp_path):
    result = runner.invoke(main, ["admin", "user", "create", "alice"])
    assert result.exit_code == 1 and "pink login" in result.stderr
    result = runner.invoke(main, ["admin", "user", "create", "alice", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = runner.invoke(main, ["admin", "migrate"])
    assert result.exit_code == 2 and "--config" in result.stderr


def test_help_and_version(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("login", "submit", "status", "logs", "download", "cancel", "nodes", "token", "admin"):
        assert name in result.stdout
    assert runner.invoke(main, ["--version"]).stdout.startswith("pink ")


# -- images ----------------------------------------------------------------------------------

def test_save_name_keeps_the_name_typed():
    tags = ["alpine:latest", "alpine:3"]
    assert images.save_name("alpine:3", tags) == "alpine:3"
    assert images.save_name("alpine", tags) == "alpine:latest"
    assert images.save_name("sha256:abc", tags) is True
    assert images.save_name("reg:5000/x", ["reg:5000/x:latest"]) == "reg:5000/x:latest"


def test_archive_for_a_file_uses_it_as_is(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"data")
    with images.archive_for(str(archive)) as path:
        assert path == str(archive)
    assert archive.exists()


# -- output -------------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
TASK = {"id": "abc123", "name": "train", "user": "alice", "state": "running", "attempt": 2,
        "created_at": "2024-05-01T11:57:00Z", "updated_at": "2024-05-01T11:59:00+00:00",
        "image": {"sha256": "f00", "size": 3 * 2**20, "image_id": "sha256:1", "repo_tags": ["me/train:1"]},
        "params": {"cmd": ["python", "train.py"], "entrypoint": None, "env": {"B": "2", "A": "1"},
                   "gpus": 1, "timeout": 3600, "output": "/out", "compression": "zstd"},
        "node": "gpu1", "exit_code": None, "error": None, "output": None, "timings": {"submitted": "x"}}


@pytest.mark.parametrize("created, expected", [
    ("2024-05-01T11:59:55Z", "5s"), ("2024-05-01T11:57:00Z", "3m"), ("2024-05-01T09:00:00+00:00", "3h"),
    ("2024-04-28T12:00:00", "3d"), ("2024-05-01T12:00:30Z", "0s"), (None, "-"), ("garbage", "-")])
def test_age(created, expected):
    assert output.age(created, NOW) == expected


def test_size():
    assert units.size(None) == "-"
    assert units.size(512) == "512 B"
    assert units.size(3 * 2**20) == "3.0 MiB"
    assert units.size(5 * 2**40) == "5.0 TiB"


def test_tasks_table():
    done = dict(TASK, id="def456", name="a-much-longer-name", state="succeeded", exit_code=0, node=None)
    lines = output.tasks_table([TASK, done], NOW).splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "NODE", "ATTEMPT", "AGE", "EXIT"]
    assert lines[1].split() == ["abc123", "train", "running", "gpu1", "2", "3m", "-"]
    assert lines[2].split() == ["def456", "a-much-longer-name", "succeeded", "-", "2", "3m", "0"]
    assert lines[1].index("running") == lines[0].index("STATE") == lines[2].index("succeeded")


def test_empty_tables_have_headers():
    assert output.tasks_table([]).split() == ["ID", "NAME", "STATE", "NODE", "ATTEMPT", "AGE", "EXIT"]
    assert output.nodes_table([]).split() == ["NAME", "HOST", "STATE", "GPUS", "TASKS", "PLATFORM", "CUDA", "EPOCH"]


def test_nodes_table():
    nodes = [{"name": "gpu1", "host": "10.0.0.5", "gpus": ["GPU-a", "GPU-b"], "tasks": ["abc"],
              "state": "up", "epoch": 7, "platform": "linux/amd64", "cuda": "12.4"}]
    assert output.nodes_table(nodes).splitlines()[1].split() == ["gpu1", "10.0.0.5", "up", "2", "1", "linux/amd64",
                                                                "12.4", "7"]


def test_task_details():
    text = output.task_details(dict(TASK, output={"size": 2048, "compression": "zstd",
                                                  "filename": "abc123.tar.zst"}))
    assert "state:        running" in text
    assert "cmd:          python train.py" in text
    assert "env:          A=1 B=2" in text
    assert "output:       abc123.tar.zst (2.0 KiB)" in text
    assert "image:        me/train:1" in text
    assert "timings:" in text


def test_state_line():
    assert output.state_line(TASK) == "task abc123: running on gpu1 (attempt 2)"
    failed = dict(TASK, state="failed", attempt=1, exit_code=3, error="boom")
    assert output.state_line(failed) == "task abc123: failed on gpu1, exit code 3: boom"


def test_finish_fails_unless_succeeded():
    commands.finish(dict(TASK, state="succeeded"))
    with pytest.raises(errors.PinkError, match="ended timed_out: deadline"):
        commands.finish(dict(TASK, state="timed_out", error="deadline"))


def test_json_is_stable():
    assert json.loads(output.to_json(TASK)) == TASK


def test_progress_bar_goes_to_stderr(runner):
    import click

    @click.command()
    def show():
        with output.ProgressBar("moving") as bar:
            for done in (0, 10, 20):
                bar(done, 20)
        with output.ProgressBar("unknown size") as bar:
            bar(5, None)
        click.echo("data")

    result = runner.invoke(show)
    assert result.exit_code == 0, result.output
    assert result.stdout == "data\n"
    assert "moving" in result.stderr
