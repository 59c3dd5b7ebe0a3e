"""`pink.request_input` alone: query numbers, JSON object bodies and typed fields."""

from __future__ import annotations

import pytest
from werkzeug.datastructures import MultiDict
from werkzeug.test import EnvironBuilder

from pink.errors import BadRequest
from pink.request_input import field, json_body, number


def refused(call, *args, **kwargs) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        call(*args, **kwargs)
    assert caught.value.status == 400
    return caught.value


def test_numbers_are_read_with_their_default():
    args = MultiDict([("limit", "20"), ("wait", "2.5"), ("empty", "")])
    assert number(args, "limit", int, 50, low=1, high=500) == 20
    assert number(args, "wait", float, 0, low=0) == 2.5
    assert number(args, "absent", int, 50) == 50 and number(args, "empty", int, 7) == 7
    assert number({"n": " 12 "}, "n") == 12  # a plain dict too; blanks around a number are fine
    assert number({"n": "-10"}, "n", int, 0, low=-10, high=10) == -10  # the bounds are inclusive
    assert number({"n": "3"}, "n", float) == 3.0


@pytest.mark.parametrize("value, kind, words", [
    ("abc", int, ["limit", "a whole number from 1 to 500", "'abc'"]),
    ("1.5", int, ["limit", "a whole number", "'1.5'"]),
    ("0", int, ["limit", "from 1 to 500", "'0'"]),
    ("501", int, ["limit", "from 1 to 500", "'501'"]),
    ("9" * 5000, int, ["limit", "..."]),  # echoed cut short
    ("nan", float, ["limit", "a number"]),
    ("inf", float, ["limit", "a number"]),
    ("1e999", float, ["limit", "a number"]),
])
def test_a_bad_number_names_the_parameter_the_value_and_the_range(value, kind, words):
    err = refused(number, {"limit": value}, "limit", kind, 50, low=1, high=500)
    assert err.code == "bad_param"
    for word in words:
        assert word in err.message, err.message
    assert len(err.message) < 200


def test_a_cap_clamps_above_and_the_floor_still_refuses():
    assert number({"wait": "3600"}, "wait", float, 0, low=0, cap=30.0) == 30.0
    assert number({"wait": "4"}, "wait", float, 0, low=0, cap=30.0) == 4.0
    err = refused(number, {"wait": "-1"}, "wait", float, 0, low=0, cap=30.0)
    assert "wait" in err.message and "0 or more" in err.message and "'-1'" in err.message


def test_a_required_number_must_be_sent():
    assert "gpus is required" in refused(number, {}, "gpus", int).message


def test_only_strings_or_numbers_of_the_kind_are_read_from_a_dict():
    assert number({"n": 4}, "n", int) == 4
    for value in (True, 4.5, [4]):
        refused(number, {"n": value}, "n", int)


def request(data: bytes | None, content_type: str | None = "application/json"):
    return EnvironBuilder(method="POST", data=data, content_type=content_type).get_request()


def test_a_json_object_body_is_read():
    assert json_body(request(b'{"a": 1}'), '{"a"}') == {"a": 1}
    assert json_body(request(b'{"a": 1}', "application/json; charset=utf-8"), '{"a"}') == {"a": 1}
    assert json_body(request(b""), '{"a"}', required=False) == {}
    assert json_body(request(b"", None), '{"a"}', required=False) == {}


@pytest.mark.parametrize("data, content_type, words", [
    (b"", "application/json", "no body"),
    (b"[1, 2]", "application/json", "a list, not an object"),
    (b'"hello"', "application/json", "the string 'hello', not an object"),
    (b"42", "application/json", "the number 42, not an object"),
    (b"null", "application/json", "null, not an object"),
    (b"{nope", "application/json", "not valid JSON"),
    (b"\xff\xfe\xfa", "application/json", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", "not valid JSON"),
    (b'{"a": 1}', "text/plain", "not JSON (text/plain)"),
    (b"a=1", "application/x-www-form-urlencoded", "not JSON"),
])
def test_a_bad_body_says_what_was_wrong_and_what_to_send(data, content_type, words):
    err = refused(json_body, request(data, content_type), '{"username", "password"}')
    assert err.code == "bad_json"
    assert words in err.message and 'send JSON {"username", "password"}' in err.message, err.message
    assert "application/json" in err.message


def test_fields_are_read_with_their_type():
    body = {"name": "x", "n": 3, "f": 2.5, "admin": True, "tags": [], "proofs": {}, "days": None}
    assert field(body, "name", str) == "x"
    assert field(body, "n", int) == 3 and field(body, "n", float) == 3  # a whole number is a number
    assert field(body, "f", float) == 2.5 and field(body, "admin", bool) is True
    assert field(body, "tags", list) == [] and field(body, "proofs", dict) == {}
    assert field(body, "absent", str, "dflt") == "dflt" and field(body, "days", float, 90, null_ok=True) is None


@pytest.mark.parametrize("body, kind, words", [
    ({"x": ["a"]}, str, ['"x" must be a string', "got a list"]),
    ({"x": True}, int, ['"x" must be a whole number', "got true"]),
    ({"x": False}, float, ['"x" must be a number', "got false"]),
    ({"x": 1.5}, int, ["a whole number", "got the number 1.5"]),
    ({"x": "yes"}, bool, ["true or false", "got the string 'yes'"]),
    ({"x": None}, str, ["a string", "got null"]),
    ({"x": {}}, list, ["a list", "got an object"]),
    ({}, str, ['"x" is missing', "a string"]),
])
def test_a_field_of_the_wrong_type_is_refused(body, kind, words):
    err = refused(field, body, "x", kind)
    assert err.code == "bad_param"
    for word in words:
        assert word in err.message, err.message


def test_null_ok_is_said_when_refusing():
    assert "a number or null" in refused(field, {"d": "soon"}, "d", float, 90, null_ok=True).message
