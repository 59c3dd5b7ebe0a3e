"""Uploads that send only what the web node lacks (`pink submit` uses them).

GPU images are gigabytes and change by kilobytes, so the client first
sends the image's config and its layers' digests and sizes; the server
answers which blobs it lacks, and which it holds, with a challenge the
client answers by hashing random ranges of each (`pink.possession.challenge`):
knowing a digest is not holding the blob, and a user's image must not be
runnable by anyone who read its manifest. The client then uploads the
missing blobs, each checksummed and resumable after a cut connection, and
commits the task with its proofs.

    POST   /api/v1/uploads  {"config": base64, "layers": [{"digest", "size"}], "repo_tags", "layout"}
           -> 201 {"upload", "missing": [digest], "challenges": {digest: {"nonce", "ranges"}}}
    HEAD   /api/v1/uploads/<id>/blobs/<digest>   -> Upload-Offset: bytes held (resume from there)
    PUT    /api/v1/uploads/<id>/blobs/<digest>   body: the blob from Upload-Offset (default 0)
           -> 201 {"offset": size} complete; 202 {"offset"} short; 200 {"offset", "challenge"}
              when the blob reached the store another way meanwhile (prove it instead)
    POST   /api/v1/uploads/<id>/commit?<the parameters of POST /tasks>  {"proofs": {digest: hex}}
           -> 201 {"task"}
    DELETE /api/v1/uploads/<id>

An upload lives on the web node that began it: its id starts with that
node's name, and the router sends the upload's requests there. A whole
archive (`POST /api/v1/tasks`) still works and fills the same store.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import ClientDisconnected

from pink import (blob_store, control, idempotency, platforms, possession, rebuilt_archive, recipes,
                  upload_sessions)
from pink.errors import BadRequest, Conflict, NotFound, PinkError, TooLarge
from pink.request_input import field, json_body, number
from pink.tasks import Params, new_id
from web.api import create_task, first_task
from web.auth import require_user
from web.resources import res
from web import sweeps as sweep_api
from web.uploads import image_record

bp = Blueprint("blob_uploads", __name__, url_prefix="/api/v1/uploads")

LAYOUTS = ("docker", "oci")


@bp.post("")
def begin():
    user = require_user()
    body = json_body(request, '{"config", "layers", "repo_tags", "layout"}')
    config_bytes, parsed = _config(body.get("config"))
    layers, layout = body.get("layers"), body.get("layout", "docker")
    if layout not in LAYOUTS:
        raise BadRequest(f"layout is one of {', '.join(LAYOUTS)}", code="bad_manifest")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise BadRequest('layers is a list of {"digest", "size"}', code="bad_manifest")
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    sizes = {config_digest: len(config_bytes), **{x.get("digest"): x.get("size") for x in layers}}
    recipe = recipes.Recipe(config=config_digest, layers=[x.get("digest") for x in layers],
                            repo_tags=body.get("repo_tags") or [], sizes=sizes)
    _check_diff_id_count(recipe, parsed)
    control.check_satisfiable(res().store, 0, platforms.of_config(parsed))  # before its layers travel
    web, limits = res().config.web, res().config.limits
    archive_bytes = rebuilt_archive.archive_size(recipe)
    if archive_bytes > web.max_upload_bytes:
        raise TooLarge(f"the image is {archive_bytes} bytes; the limit is {web.max_upload_bytes}")
    opened = upload_sessions.check_room(web.blob_root, user.name, limits.upload_sessions_per_user)
    control.check_submit(res().store, res().config, user.name, 0, opened + archive_bytes)
    store = res().blobs
    missing = store.missing(recipe.layers)
    challenges = {d: possession.challenge_held(store, d, recipe.sizes[d])
                  for d in dict.fromkeys(recipe.layers) if d not in missing}
    store.write(f"cfg-{new_id()}", config_digest, io.BytesIO(config_bytes), len(config_bytes))
    session = upload_sessions.create(web.blob_root, res().config.host, user.name, recipe, layout, challenges)
    return jsonify(upload=session.id, missing=missing, challenges=challenges), 201


def _config(text) -> tuple[bytes, dict]:
    """The config's exact bytes (its digest is the image id) and the config parsed."""
    try:
        data = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except (binascii.Error, ValueError):
        data = None
    if not data or len(data) > recipes.MAX_CONFIG_BYTES:
        raise BadRequest("config is the image config's bytes in base64 "
                         f"(at most {recipes.MAX_CONFIG_BYTES} bytes)",
                         code="bad_manifest")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest("the image config is not JSON", code="bad_manifest") from None
    if not isinstance(parsed, dict):
        raise BadRequest("the image config is not a JSON object", code="bad_manifest")
    return data, parsed


def _check_diff_id_count(recipe: recipes.Recipe, config: dict) -> None:
    """The config lists one diff_id per layer. Whether each is its layer's is
    checked at commit, once every layer is in the store (`blob_store.verified_diff_ids`),
    whatever layout the client says it sent."""
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(recipe.layers):
        raise BadRequest(f"the config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} layer "
                         f"diff_ids for {len(recipe.layers)} layers", code="bad_manifest")


def _session(upload_id: str) -> upload_sessions.Session:
    user = require_user()
    home = upload_sessions.host_of(upload_id)
    if home and home != res().config.host:
        raise PinkError(f"upload {upload_id} lives on web node {home}, not {res().config.host}: send its "
                        "requests through the router, which takes them there", code="misdirected", status=421)
    return upload_sessions.load(res().config.web.blob_root, upload_id, user.name)


def _blob_of(session: upload_sessions.Session, digest: str) -> int:
    if digest not in session.recipe.layers:
        raise NotFound(f"upload {session.id} has no layer {digest[:80]}", code="unknown_blob")
    return session.recipe.sizes[digest]


@bp.route("/<upload_id>/blobs/<digest>", methods=["HEAD"])
def held(upload_id: str, digest: str):
    session = _session(upload_id)
    size = _blob_of(session, digest)
    offset = size if session.done(digest) else res().blobs.offset(session.id, digest)
    return "", 200, {"Upload-Offset": str(offset), "Upload-Length": str(size)}


@bp.put("/<upload_id>/blobs/<digest>")
def put_blob(upload_id: str, digest: str):
    session = _session(upload_id)
    size = _blob_of(session, digest)
    store = res().blobs
    if session.done(digest):
        return jsonify(offset=size), 201
    offset = number(request.headers, "Upload-Offset", int, 0, low=0)  # bytes the client skips
    try:
        held = store.write(session.id, digest, request.stream, size, offset, limit=request.content_length,
                           present_ok=False)
    except Conflict as exc:
        if exc.code != "present":
            raise
        # Another upload stored it meanwhile: reading ours would prove nothing.
        challenge = session.challenge(digest) or possession.challenge_held(store, digest, size)
        session.add_challenge(digest, challenge)
        return jsonify(offset=size, challenge=challenge), 200, {"Connection": "close"}
    except ClientDisconnected:
        raise BadRequest("the blob upload was cut off: HEAD it for the offset and send the rest",
                         code="truncated") from None
    if held < size:
        return jsonify(offset=held), 202
    session.mark_done(digest)  # first: a retry after a timeout answers 201 and never hashes again
    store.prepare_diff_id(digest)  # bounded by this upload; commit reads what it kept
    return jsonify(offset=size), 201


@bp.post("/<upload_id>/commit")
def commit(upload_id: str):
    """Create the task once every layer was uploaded in this session or proved held."""
    user = require_user()
    params = Params.parse(request.args)
    claim = idempotency.claim(request.headers.get(idempotency.HEADER), "commit", upload=upload_id,
                              params=dataclasses.asdict(params), **sweep_api.fingerprint())
    if first := control.replay(res().store, user.name, claim):  # before the session: the first closed it
        return first_task(first)
    session = _session(upload_id)
    body = json_body(request, '{"proofs": {digest: hex}}', required=False)
    proofs = field(body, "proofs", dict, None, null_ok=True) or {}
    store = res().blobs
    unproven = [d for d in dict.fromkeys(session.recipe.layers)
                if not (store.has(d) and (session.done(d) or _proved(store, session, d, proofs.get(d))))]
    if unproven:
        raise Conflict(f"{len(unproven)} layer(s) are neither uploaded nor proved held: upload them "
                       f"(the first is {unproven[0]})", code="blobs_missing")
    try:
        blob_store.verified_diff_ids(store, session.recipe)
    except BadRequest:
        session.close()  # its config and layers are fixed: it can never commit
        raise
    for digest in session.recipe.blobs:
        store.touch(digest)
    received = session.recipe.sizes[session.recipe.config] + sum(
        session.recipe.sizes[d] for d in dict.fromkeys(session.recipe.layers) if session.done(d))
    answer = create_task(user, new_id(), params, image_record(session.recipe, session.layout), received,
                         claim)
    session.close()  # a refusal keeps it open: the same upload may commit with other parameters
    return answer


def _proved(store: blob_store.BlobStore, session: upload_sessions.Session, digest: str, answer) -> bool:
    challenge = session.challenge(digest)
    return challenge is not None and possession.check_proof(store, digest, challenge, answer)


@bp.delete("/<upload_id>")
def abandon(upload_id: str):
    _session(upload_id).close()
    return jsonify(abandoned=upload_id)
