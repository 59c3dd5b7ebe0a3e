"""Bad uploads get a clear 4xx JSON error and leave no spool file, etcd record or RQ job."""

from __future__ import annotations

import os
import socket
import ssl
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
from redis import Redis

from pink import blob_store, image_archive, rebuilt_archive, recipes
from pink import config as pink_config_module
from pink.store import Store
from tests import images
from tests.helpers import Api, make_user

LIMIT = 8 * 2**20  # bytes: this module's upload limit


@pytest.fixture
def small_api(pink_processes, config_variant):
    """pink-web alone (nothing else may pick up a task), with a small upload limit."""
    path = config_variant("small", web={"max_upload_bytes": LIMIT})
    pink_processes.web(path)
    config = pink_config_module.load(path)
    return Api(config, make_user(config, "alice"))


def assert_nothing_left(small_api):
    spool = Path(small_api.config.web.spool_dir)
    assert not spool.exists() or list(spool.iterdir()) == []
    store = Store.from_config(small_api.config)
    assert store.list(store.keys.tasks) == []
    assert Redis.from_url(small_api.config.redis_url).keys("rq:job:*") == []


def assert_refused(small_api, archive, status, code, words):
    r = small_api.submit(archive)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert words in body["message"], body
    assert_nothing_left(small_api)


@pytest.fixture(scope="module")
def good_archive(docker_client, tmp_path_factory):
    tag = images.ensure_busybox_image(docker_client)
    path = tmp_path_factory.mktemp("good") / "busybox.tar"
    images.save_image(docker_client, tag, path)
    return path


def test_not_a_tar(small_api, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive\n" * 100)
    assert_refused(small_api, junk, 400, "not_tar", "not a tar")


def test_tar_without_manifest(small_api, tmp_path):
    path = images.write_tar(tmp_path / "plain.tar", [("hello.txt", b"hi")])
    assert_refused(small_api, path, 400, "no_manifest", "docker save")


def test_manifest_naming_a_missing_layer(small_api, good_archive, tmp_path):
    with tarfile.open(good_archive) as tar:
        layer = next(n for n in tar.getnames() if n.endswith("layer.tar"))
    path = images.copy_tar(good_archive, tmp_path / "missing.tar", drop=[layer])
    assert_refused(small_api, path, 400, "missing_layer", layer)


@pytest.mark.parametrize("member", [
    ("../escape.txt", b"x"),
    ("/etc/evil", b"x"),
    images.symlink("link", "../../etc/passwd"),
    images.hardlink("hard", "/etc/shadow"),
])
def test_members_that_escape(small_api, good_archive, tmp_path, member):
    path = images.copy_tar(good_archive, tmp_path / "hostile.tar", add=[member])
    assert_refused(small_api, path, 400, "unsafe_member", "")


def test_upload_over_the_limit(small_api, tmp_path):
    big = tmp_path / "big.tar"
    with open(big, "wb") as fh:
        fh.truncate(LIMIT + 1)
    assert_refused(small_api, big, 413, "too_large", str(LIMIT))


def test_chunked_upload_over_the_limit(small_api, tmp_path):
    def body():
        chunk = b"\0" * 2**20
        for _ in range(LIMIT // len(chunk) + 2):
            yield chunk
    r = small_api("POST", "/tasks", data=body(), headers={"Content-Type": "application/x-tar"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert_nothing_left(small_api)


def test_upload_cut_off_half_way(small_api, good_archive):
    size = os.path.getsize(good_archive)
    url = urlparse(small_api.url)
    context = ssl.create_default_context(cafile=small_api.ca)
    with socket.create_connection((url.hostname, url.port)) as raw:
        with context.wrap_socket(raw, server_hostname=url.hostname) as sock:
            sock.sendall((f"POST /small_api/v1/tasks HTTP/1.1\r\nHost: {url.netloc}\r\n"
                          f"Authorization: Bearer {small_api.token}\r\nContent-Type: application/x-tar\r\n"
                          f"Content-Length: {size}\r\n\r\n").encode())
            with open(good_archive, "rb") as fh:
                sock.sendall(fh.read(size // 2))
    # The server notices the disconnect and must clean up; give it a moment.
    import time
    deadline = time.monotonic() + 10
    while True:
        try:
            assert_nothing_left(small_api)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_missing_and_wrong_tokens(small_api, good_archive):
    anonymous = Api(small_api.config, "")
    del anonymous.http.headers["Authorization"]
    r = anonymous.submit(good_archive)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    wrong = Api(small_api.config, "pink_not-a-token")
    r = wrong("GET", "/tasks")
    assert r.status_code == 401 and "pink login" in r.json()["message"]
    assert_nothing_left(small_api)


def test_unknown_task(small_api):
    for method, path in (("GET", "/tasks/nope"), ("GET", "/tasks/nope/logs"),
                         ("GET", "/tasks/nope/output"), ("DELETE", "/tasks/nope")):
        r = small_api(method, path)
        assert r.status_code == 404 and r.json()["error"] == "unknown_task", (method, path, r.text)


def test_bad_parameters(small_api, good_archive):
    for params, words in (({"gpus": "many"}, "gpus"), ({"env": "NOEQUALS"}, "KEY=VALUE"),
                          ({"output": "relative/path"}, "absolute"), ({"compression": "lz4"}, "compression")):
        r = small_api.submit(good_archive, **params)
        assert r.status_code == 400 and words in r.json()["message"], r.text
    assert_nothing_left(small_api)


def test_a_good_upload_is_recorded(small_api, good_archive):
    r = small_api.submit(good_archive, name="ok")
    assert r.status_code == 201, r.text
    task = r.json()["task"]
    assert task["state"] == "queued" and task["timings"]["upload_bytes"] == os.path.getsize(good_archive)
    assert list(Path(small_api.config.web.spool_dir).iterdir()) == []  # the archive went into the blob store
    info = image_archive.inspect(good_archive)
    recipe, _ = recipes.Recipe.from_archive(good_archive, info)
    assert task["image"]["sha256"] == recipe.key and task["image"]["image_id"] == info.image_id
    assert task["image"]["size"] == rebuilt_archive.archive_size(recipe)
    store = blob_store.BlobStore(small_api.config.web.blob_root, 2**40)
    assert store.missing(recipe.blobs) == []


def test_multipart_upload_from_a_form(small_api, good_archive):
    with open(good_archive, "rb") as fh:
        r = small_api("POST", "/tasks", params={"name": "form"}, files={"image": ("image.tar", fh)})
    assert r.status_code == 201, r.text
    task = r.json()["task"]
    assert task["name"] == "form" and task["timings"]["upload_bytes"] == os.path.getsize(good_archive)


def test_multipart_without_the_file_field(small_api):
    r = small_api("POST", "/tasks", files={"other": ("x.tar", b"junk")})
    assert r.status_code == 400 and r.json()["error"] == "no_file"
    assert_nothing_left(small_api)
