"""Proof of possession: a client shows it holds a blob's bytes, not only its digest.

A web node that holds a blob already skips its upload only when the client
answers a `challenge` with the `proof` over random ranges of it
(`check_proof`): digests are in every manifest, so knowing one proves
nothing (see `challenge`). Used by the layer upload protocol
(`web.blob_uploads`) and its client (`pink_cli.layer_upload`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from pink.blob_store import BlobStore
from pink.errors import BadRequest, NotFound, PinkError

PROOF_RANGES = 8  # ranges of a blob a client must hash to show it holds the blob
PROOF_RANGE = 64 * 2**10  # bytes per range; a blob up to PROOF_RANGES ranges is hashed whole


def challenge(size: int) -> dict:
    """A fresh challenge for a blob of `size` bytes: a nonce and the ranges to hash.

    A server holding a blob does not take a client's word that it has the
    same one: knowing a digest (they are in every manifest) is not holding
    the bytes, and skipping the upload on the digest alone would let anyone
    run an image whose layers belong to another user's private image. The
    client answers with `proof()` over random ranges it can only read if it
    holds the blob, at the cost of reading PROOF_RANGES * PROOF_RANGE bytes
    instead of uploading them all.
    """
    if size <= PROOF_RANGES * PROOF_RANGE:
        ranges = [[0, size]]
    else:
        rng = secrets.SystemRandom()
        ranges = sorted([offset, PROOF_RANGE] for offset in
                        (rng.randrange(0, size - PROOF_RANGE + 1) for _ in range(PROOF_RANGES)))
    return {"nonce": secrets.token_hex(16), "ranges": ranges}


def challenge_held(store: BlobStore, digest: str, claimed) -> dict:
    """A challenge for blob `digest` over the size `store` holds, never the client's claim.

    A claimed size that differs is refused: the digest names these very bytes,
    so another size is a mistake or a lie, and ranges drawn from it (none at
    all for a claimed 0) could prove nothing.
    """
    held = store.size(digest)
    if claimed != held:
        raise BadRequest(f"layer sha256:{digest} is {held} bytes, not the {str(claimed)[:40]} your manifest "
                         "says: send each layer's size as `docker save` wrote it", code="wrong_size")
    return challenge(held)


def proof(read, challenge: dict) -> str:
    """HMAC-SHA256 keyed by the nonce over the challenged ranges; `read(offset, length)` reads the blob."""
    mac = hmac.new(bytes.fromhex(challenge["nonce"]), digestmod=hashlib.sha256)
    for offset, length in challenge["ranges"]:
        data = read(offset, length)
        if len(data) != length:
            raise PinkError(f"the blob is shorter than the challenge's range at {offset}", code="bad_blob")
        mac.update(data)
    return mac.hexdigest()


def check_proof(store: BlobStore, digest: str, challenge: dict, answer) -> bool:
    """Whether `answer` proves possession of blob `digest` (in `store`) for `challenge`.

    Ranges that read none of a non-empty blob prove nothing, whoever drew them.
    """
    if not isinstance(answer, str):
        return False
    try:
        if store.size(digest) and not any(length for _, length in challenge["ranges"]):
            return False
    except (NotFound, KeyError, TypeError, ValueError):
        return False

    def read(offset: int, length: int) -> bytes:
        with open(store.path(digest), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    try:
        return hmac.compare_digest(proof(read, challenge), answer)
    except (OSError, PinkError):
        return False
