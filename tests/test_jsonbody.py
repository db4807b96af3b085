"""jsonbody.py: the one decoder of request bodies, on bytes (differentially against the stdlib
for the JSON it takes), and on every route that reads a body: hostile JSON is a 400 in the
route's dialect, never a 500, and no traceback is logged."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smart_proxy.errors import BadRequest
from smart_proxy.jsonbody import MAX_DEPTH, decode

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def nested(depth: int) -> bytes:
    """An array nested ``depth`` levels deep (``[[]]`` is 2)."""
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (nested(100_000), f"nests more than {MAX_DEPTH} deep"),  # past the stdlib's own recursion limit
        (nested(MAX_DEPTH + 1), f"nests more than {MAX_DEPTH} deep"),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), f"nests more than {MAX_DEPTH} deep"),
        (b'{"x": ' + b"7" * 5000 + b"}", "integer of more than 4300 digits"),
        (b'{"seed": 1e999}', "1e999 is out of range"),
        (b'{"seed": -1e999}', "-1e999 is out of range"),
        (b'{"top_k": NaN}', "NaN is not a JSON number"),
        (b'{"top_k": Infinity}', "Infinity is not a JSON number"),
        (b"[-Infinity]", "-Infinity is not a JSON number"),
        (b'{"content": "\\ud800"}', "lone surrogate (\\ud800)"),
        (b'{"content": "a\\uDFFFb"}', "lone surrogate (\\udfff)"),
        (b'{"\\ud83d": 1}', "lone surrogate (\\ud83d)"),  # a key is a string too
        (b'["\\ude00\\ud83d"]', "lone surrogate"),  # a pair the wrong way round is two lone halves
        (json.dumps(CHAT).encode("utf-16"), "not UTF-8"),
        (json.dumps(CHAT).encode("utf-32"), "not UTF-8"),
        (json.dumps(CHAT).encode("utf-16-le"), "not valid JSON"),  # no BOM: NUL bytes are UTF-8, not JSON
        (b"\xef\xbb\xbf" + json.dumps(CHAT).encode(), "byte order mark"),
        (b'{"a": "\xff"}', "not UTF-8 text (byte 7)"),
        (b'{"a": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate encoded as bytes
        (b"{nope", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_hostile_bodies_are_bad_requests(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode(raw)
    assert message in info.value.message
    assert info.value.status == 400


def test_what_is_json_is_taken() -> None:
    assert decode(nested(MAX_DEPTH)) is not None  # the deepest allowed
    assert decode(b"[" + b"{}," * 1000 + b"1]")[0] == {}  # many brackets, none deep
    assert decode(b'["\\ud83d\\ude00", "[[[[", "\\\\ud800"]') == ["\U0001f600", "[[[[", "\\ud800"]
    assert decode(b"[" + b"9" * sys.get_int_max_str_digits() + b"]")[0] > 0
    assert decode(b"[1e308, -1e308, 5e-324, 1E+2]") == [1e308, -1e308, 5e-324, 100.0]
    assert decode('{"ü": "€ \U0001f600"}'.encode()) == {"ü": "€ \U0001f600"}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_JSON, ensure_ascii=st.booleans())
def test_decode_agrees_with_the_stdlib_on_json_it_takes(value: object, ensure_ascii: bool) -> None:
    """Differential: any JSON text of finite numbers and Unicode strings decodes as json.loads decodes it."""
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(raw)
    except ValueError:  # surrogatepass let a lone surrogate through as bytes: not UTF-8
        with pytest.raises(BadRequest):
            decode(raw)
        return
    if ensure_ascii and any("\ud800" <= c <= "\udfff" for c in json.dumps(value, ensure_ascii=False)):
        with pytest.raises(BadRequest, match="surrogate"):
            decode(raw)
        return
    assert decode(raw) == expected


# ---- on the routes --------------------------------------------------------------------------

#: Every route that reads a JSON body.
BODY_ROUTES = [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/chat/completions", "/v1/responses", "/v1/rerank",
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull",
]  # fmt: skip
_HOSTILE = {
    "deep": nested(100_000),
    "long integer": b'{"model": "a", "messages": [], "prompt": "", "input": "", "x": ' + b"1" * 5000 + b"}",
    "1e999 seed": b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", '
    b'"options": {"seed": 1e999}, "seed": 1e999}',
    "NaN top_k": b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", '
    b'"options": {"top_k": NaN}, "top_k": NaN}',
    "surrogate": b'{"model": "a", "messages": [{"role": "user", "content": "\\ud800"}], "prompt": "\\ud800", "input": "\\ud800"}',
    "utf-16": json.dumps({"model": "a", "messages": [], "prompt": "hi", "input": "hi"}).encode("utf-16"),
}


def dialect_error(path: str, response) -> str:
    """The message of an error answer, checked to be in the dialect of ``path``."""
    body = response.json()
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return body["error"]
    error = body["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error", body
    assert error["code"] == response.status_code, body
    return error["message"]


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_hostile_json_is_a_400_in_the_routes_dialect_on_every_route(
    path: str, make_config, start_proxy, http, caplog
) -> None:
    url = await start_proxy(make_config({"a": {}}, model_options={"a": {"embeddings": "true"}}))
    caplog.set_level(logging.INFO)
    for name, raw in _HOSTILE.items():
        caplog.clear()
        response = await http.post(url + path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert dialect_error(path, response), name
        assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR], name
    assert (await http.get(url + "/health")).status_code == 200

