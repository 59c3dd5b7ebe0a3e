"""What a client sends, read one way: query (and header) numbers, JSON object
bodies and their typed fields, each refusal a `BadRequest` (400) that names what
was wrong and what to send. Used by every web endpoint and `pink.tasks.Params`;
imports no Flask (a body is read from anything with `get_data()` and `is_json`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from pink.errors import BadRequest

REQUIRED: Any = object()  # a `default` meaning: there is none, the client must send it
SHOWN_CHARS = 80  # of a refused value, echoed in the message

_KIND_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _bounds(low, high, cap) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f", {low} or more" + (f" (above {cap}, {cap} is used)" if cap is not None else "")
    if high is not None:
        return f", at most {high}"
    return f" (above {cap}, {cap} is used)" if cap is not None else ""


def number(args: Mapping, name: str, kind: type = int, default: Any = REQUIRED, *,
           low: float | None = None, high: float | None = None, cap: float | None = None):
    """`args[name]` (a query string's MultiDict, headers or a dict) as an int or
    a finite float within [low, high]; `default` when it is absent or empty.
    A value above `cap` is read as `cap` (a limit the client need not know)."""
    text = args.get(name)
    if text is None or text == "":
        if default is REQUIRED:
            raise BadRequest(f"{name} is required: {_KIND_NAMES[kind]}{_bounds(low, high, cap)}", code="bad_param")
        return default
    refused = BadRequest(f"{name} must be {_KIND_NAMES[kind]}{_bounds(low, high, cap)}, got {_shown(text)}",
                         code="bad_param")
    if isinstance(text, bool):
        raise refused
    try:
        value = kind(text) if isinstance(text, str) else text
    except (ValueError, OverflowError):
        raise refused from None
    if not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or not math.isfinite(value):
        raise refused
    if (low is not None and value < low) or (high is not None and value > high):
        raise refused
    return min(value, cap) if cap is not None else value


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def flag(args: Mapping, name: str, default: Any = None):
    """`args[name]` as a query flag: 1/true/yes or 0/false/no (any case); `default`
    when absent or empty. Anything else is refused, never read as false."""
    text = args.get(name)
    if text is None or text == "":
        return default
    value = _FLAGS.get(str(text).lower())
    if value is None:
        raise BadRequest(f"{name} must be 1 or 0 (true or false), got {_shown(text)}", code="bad_param")
    return value


def json_body(request, expect: str, *, required: bool = True) -> dict:
    """The request's body as a JSON object; `expect` shows what to send
    (`{"username", "password"}`). With `required=False` no body reads as {}.
    Only a JSON content type is read, so no cross-site form can post here."""
    data = request.get_data(cache=True)
    send = f"send JSON {expect} with Content-Type: application/json"
    if not data:
        if required:
            raise BadRequest(f"the request has no body: {send}", code="bad_json")
        return {}
    if not request.is_json:
        raise BadRequest(f"the body is not JSON ({request.mimetype or 'no Content-Type'}): {send}",
                         code="bad_json")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"the body is not valid JSON ({exc}): {send}", code="bad_json") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body is {_json_type(body)}, not an object: {send}", code="bad_json")
    return body


def field(body: Mapping, name: str, kind: type, default: Any = REQUIRED, *, null_ok: bool = False):
    """`body[name]` if it is of `kind` (str, int, float, bool, list or dict;
    true/false is no number, a whole number is a float); `default` when absent,
    None when it is null and `null_ok`."""
    if name not in body:
        if default is REQUIRED:
            raise BadRequest(f'"{name}" is missing: send {_KIND_NAMES[kind]}', code="bad_param")
        return default
    value = body[name]
    if value is None and null_ok:
        return None
    if isinstance(value, bool) and kind is not bool:
        ok = False
    elif kind is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        also = " or null" if null_ok else ""
        raise BadRequest(f'"{name}" must be {_KIND_NAMES[kind]}{also}, got {_json_type(value)}', code="bad_param")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {_shown(value)}"
    if isinstance(value, str):
        return f"the string {_shown(value)}"
    return "a list" if isinstance(value, list) else "an object"
