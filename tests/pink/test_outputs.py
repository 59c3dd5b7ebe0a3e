"""A peer's copy of an output (pink.outputs.receive), without services: only
a signed copy with an output's name lands, whole, inside the output store."""

from __future__ import annotations

import hashlib
import io
import shutil
from types import SimpleNamespace

import pytest

from pink import outputs
from pink.errors import BadRequest, Forbidden

SECRET = "s" * 48
DATA = b"an output" * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()


def node(tmp_path, secret: str = SECRET):
    return SimpleNamespace(web=SimpleNamespace(secret_key=secret, output_dir=str(tmp_path / "outputs")))


def push(config, name: str, data: bytes = DATA, digest: str = DIGEST, signed: str | None = None):
    signed = signed if signed is not None else outputs.signature(SECRET, name, len(data), digest)
    return outputs.receive(config, name, len(data), digest, signed, io.BytesIO(data))


def test_a_signed_copy_lands_whole_and_a_second_is_taken_as_there(tmp_path):
    config = node(tmp_path)
    assert push(config, "0123456789ab-1.tar.zst") is True
    assert (tmp_path / "outputs" / "0123456789ab-1.tar.zst").read_bytes() == DATA
    assert push(config, "0123456789ab-1.tar.zst") is False
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["0123456789ab-1.tar.zst"]


@pytest.mark.parametrize("name", ["../0123456789ab-1.tar.zst", "0123456789ab-1.tar.zst/..", "x.tar.zst",
                                  "0123456789ab-1.tar", ".0123456789ab-1.tar.zst", "0123456789ab-1.tar.zst.part",
                                  "/etc/passwd"])
def test_only_an_outputs_name_is_taken(tmp_path, name):
    with pytest.raises(BadRequest):
        push(node(tmp_path), name)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_a_copy_not_signed_with_the_clusters_secret_is_refused(tmp_path):
    name = "0123456789ab-1.tar.zst"
    for signed in ("", "0" * 64, outputs.signature("another secret", name, len(DATA), DIGEST),
                   outputs.signature(SECRET, name, len(DATA) + 1, DIGEST)):
        with pytest.raises(Forbidden):
            push(node(tmp_path), name, signed=signed)
    with pytest.raises(Forbidden):  # a node without a secret takes nothing
        push(node(tmp_path, secret=""), name, signed=outputs.signature("", name, len(DATA), DIGEST))


def test_bytes_that_do_not_match_the_signed_digest_leave_nothing(tmp_path):
    name = "0123456789ab-2.tar.gz"
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(BadRequest):
        push(node(tmp_path), name, digest=other)
    assert list((tmp_path / "outputs").iterdir()) == []


def test_an_export_that_can_never_be_stored_is_refused_before_a_byte_is_written(tmp_path):
    """room_for: over the per-task cap, or bigger than the whole output
    filesystem, an export is refused for good (its task fails) with the
    limit or the store's size in the message; nothing is written."""
    with pytest.raises(outputs.Refused, match=r"limits.output_bytes_per_task \(1000 bytes\)"):
        outputs.room_for(str(tmp_path), 1001, 1000, "web1")
    total = shutil.disk_usage(tmp_path).total
    with pytest.raises(outputs.Refused, match="holds only"):
        outputs.room_for(str(tmp_path), total + 1, total * 2, "web1")
    outputs.room_for(str(tmp_path), 1, 1000, "web1")
    assert list(tmp_path.iterdir()) == []
