"""Property-based fuzzing of every route of an in-process proxy over the fake llama-server.

Each route gets bodies built from its dialect's schema (a valid request of OpenAI's or
Ollama's shape), then mutated: a field anywhere in it replaced by a value of another type,
a huge or non-finite number, a lone surrogate, deep nesting, or dropped; the whole body
re-encoded (UTF-16, UTF-32, a BOM) or cut short. The property, per request:

* the status is under 500 (501 where a route says it is not supported);
* an error is in the route's dialect: ``{"error": "..."}`` under ``/api/``, Anthropic's
  ``{"type": "error", "error": {...}}`` under ``/v1/messages``, the OpenAI error object elsewhere;
* nothing is logged at ERROR or with a traceback;
* the proxy stays healthy: ``/health`` (strict JSON) and ``/api/ps`` answer 200.

Hypothesis runs in a worker thread (its engine is synchronous) and sends each request
through the test's Trio loop, where the proxy runs, with ``trio.from_thread``: one proxy
per route, however many examples. The examples are fixed (``derandomize``, no database)
so CI is reproducible, and few enough that the file runs in well under a minute.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_agents import copy_bundled, with_agents

#: Examples per route: the whole file stays well under a minute. SMART_PROXY_FUZZ_EXAMPLES searches longer.
EXAMPLES = int(os.environ.get("SMART_PROXY_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example: a request that hangs is a finding
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

MODELS = ["a", "e", "nope", "", "a:latest", "hf.co/org/repo:Q4_K_M", "../../etc/passwd", "A" * 300]

# ---- hostile values -------------------------------------------------------------------------

#: Raw JSON put in place of a value after encoding: what json.dumps cannot write, or what breaks decoders.
RAW = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"-" + b"9" * 4301,
    b'"\\ud800"', b'"x\\udfff"', b'"\\udc00\\ud83d"', b'{"\\ud83d": 1}',
    b"[" * 257 + b"]" * 257, b"[" * 20000 + b"]" * 20000, b'{"a":' * 600 + b"1" + b"}" * 600,
]  # fmt: skip
_MARK = "\x00raw{}\x00"
_MARKED = re.compile(rb'"\\u0000raw(\d+)\\u0000"')

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**300])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5])
    | st.text(max_size=20)
    | st.sampled_from(["nan", "NaN", "inf", "-1", "5m", "1e12", "300000000000s", "\U0001f600", "/json x", "\x00", "data:"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
) | st.sampled_from(range(len(RAW))).map(_MARK.format)

TEXT = st.text(max_size=30) | st.sampled_from(["hi", "/json give me JSON", "", "\U0001f600 ok"])

# ---- valid bodies, per dialect --------------------------------------------------------------


def _optional(**fields: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


def _with(required: dict[str, st.SearchStrategy], **optional: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(required, optional=optional)


_MODEL = st.sampled_from(MODELS[:2]) | st.sampled_from(MODELS)
_OPENAI_MESSAGE = _with({"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": TEXT})
_SAMPLING = dict(
    max_tokens=st.integers(1, 8), temperature=st.floats(0, 2), top_p=st.floats(0, 1), seed=st.integers(0, 2**32),
    stop=st.lists(st.text(max_size=3), max_size=2), n=st.integers(1, 2), logprobs=st.booleans(),
)  # fmt: skip
_OLLAMA_OPTIONS = _optional(
    temperature=st.floats(0, 2), top_k=st.integers(0, 100), top_p=st.floats(0, 1), seed=st.integers(0, 2**32),
    num_predict=st.integers(-2, 8), stop=st.lists(st.text(max_size=3), max_size=2) | st.text(max_size=3),
    num_ctx=st.integers(1, 4096), mirostat=st.integers(0, 2),
)  # fmt: skip
_OLLAMA_MESSAGE = _with(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": TEXT},
    images=st.lists(st.sampled_from(["aGk=", "/9j/AA==", "data:image/png;base64,aGk="]), max_size=1),
    tool_calls=st.lists(st.fixed_dictionaries({"function": _with({"name": st.text(max_size=5)}, arguments=VALUES)})),
    thinking=TEXT,
    tool_name=st.text(max_size=5),
)
_COMMON_OLLAMA = dict(
    stream=st.booleans(), options=_OLLAMA_OPTIONS, keep_alive=st.sampled_from([0, -1, "5m", 30, "1h30m", "250ms"]),
    format=st.sampled_from(["json", "", {"type": "object"}]), think=st.sampled_from([True, False, "low", "high"]),
)  # fmt: skip

_ANTHROPIC_BLOCK = (
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
    | st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries(
        {"type": st.just("base64"), "media_type": st.just("image/png"), "data": st.just("aGk=")})})
    | st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.text(max_size=5), "content": TEXT})
    | st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.text(max_size=5), "name": st.text(max_size=5),
                             "input": st.dictionaries(st.text(max_size=3), SCALARS, max_size=2)})
)  # fmt: skip
_ANTHROPIC_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]), "content": TEXT | st.lists(_ANTHROPIC_BLOCK, min_size=1, max_size=3)}
)
_ANTHROPIC = dict(
    system=TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
    tools=st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "input_schema": st.just({"type": "object"})}), max_size=1),
    tool_choice=st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": "f"}]),
    temperature=st.floats(0, 1), top_p=st.floats(0, 1), top_k=st.integers(0, 50),
    stop_sequences=st.lists(st.text(max_size=3), max_size=2), metadata=st.just({"user_id": "u"}),
)  # fmt: skip
_RESPONSES_PART = st.fixed_dictionaries({"type": st.just("input_text"), "text": TEXT}) | st.fixed_dictionaries(
    {"type": st.just("input_image"), "image_url": st.just("data:image/png;base64,aGk=")}
)
_RESPONSES_ITEM = _with(
    {"role": st.sampled_from(["user", "system", "developer", "assistant"]),
     "content": TEXT | st.lists(_RESPONSES_PART, max_size=2)},
    type=st.just("message"),
) | st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.just("c1"), "output": TEXT})
_RERANK = _with(
    {"model": st.sampled_from(["r", "a"]) | _MODEL, "query": TEXT, "documents": st.lists(TEXT, min_size=1, max_size=3)},
    top_n=st.integers(0, 4),
    return_documents=st.booleans(),
)

SCHEMAS: dict[str, st.SearchStrategy[dict]] = {
    "/v1/chat/completions": _with(
        {"model": _MODEL, "messages": st.lists(_OPENAI_MESSAGE, min_size=1, max_size=3)},
        stream=st.booleans(),
        tools=st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=1),
        response_format=st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
        **_SAMPLING,
    ),
    "/v1/completions": _with({"model": _MODEL, "prompt": TEXT | st.lists(TEXT, max_size=2)}, stream=st.booleans(), **_SAMPLING),
    "/v1/embeddings": _with({"model": _MODEL, "input": TEXT | st.lists(TEXT, max_size=3)}, encoding_format=st.just("float")),
    "/v1/responses": _with(
        {"model": _MODEL, "input": TEXT | st.lists(_RESPONSES_ITEM, min_size=1, max_size=3)},
        stream=st.booleans(), instructions=TEXT, max_output_tokens=st.integers(1, 8), temperature=st.floats(0, 2),
        tools=st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": st.text(max_size=5)}), max_size=1),
    ),
    **{path: _RERANK for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")},
    "/api/chat": _with(
        {"model": _MODEL, "messages": st.lists(_OLLAMA_MESSAGE, max_size=3)},
        tools=st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=1),
        logprobs=st.booleans(),
        top_logprobs=st.integers(0, 3),
        **_COMMON_OLLAMA,
    ),
    "/api/generate": _with(
        {"model": _MODEL, "prompt": TEXT},
        system=TEXT,
        raw=st.booleans(),
        images=st.lists(st.just("aGk="), max_size=1),
        suffix=TEXT,
        context=st.just([1, 2]),
        template=TEXT,
        **_COMMON_OLLAMA,
    ),
    "/api/embed": _with(
        {"model": _MODEL, "input": TEXT | st.lists(TEXT, max_size=3)},
        keep_alive=st.sampled_from([0, "5m", -1]),
        dimensions=st.integers(1, 4),
        truncate=st.booleans(),
    ),
    "/api/embeddings": _with({"model": _MODEL, "prompt": TEXT}, keep_alive=st.sampled_from([0, "5m"]), options=_OLLAMA_OPTIONS),
    "/api/show": _with({"model": _MODEL}, verbose=st.booleans()) | _with({"name": _MODEL}),
    "/api/pull": _with({"model": _MODEL}, stream=st.booleans(), insecure=st.booleans()),
    "/api/delete": _with({"model": _MODEL}) | _with({"name": _MODEL}),
    "/api/create": _with({"model": _MODEL}, **{"from": _MODEL, "stream": st.booleans()}),
    "/api/copy": _with({"source": _MODEL, "destination": _MODEL}),
    "/api/push": _with({"model": _MODEL}),
    "/api/blobs/<path:digest>": st.just({}),
    "/v1/messages": _with(
        {"model": _MODEL, "max_tokens": st.integers(1, 8), "messages": st.lists(_ANTHROPIC_MESSAGE, min_size=1, max_size=3)},
        stream=st.booleans(),
        **_ANTHROPIC,
    ),
    "/v1/messages/count_tokens": _with(
        {"model": _MODEL, "messages": st.lists(_ANTHROPIC_MESSAGE, min_size=1, max_size=3)}, **_ANTHROPIC
    ),
}
#: The OpenAI routes without ``/v1``, as llama-server serves them: fuzzed as the routes they stand for.
SCHEMAS.update(
    {path.removeprefix("/v1"): SCHEMAS[path] for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")}
)
#: Routes with no body: any query string and headers.
BODILESS = ["/", "/api/version", "/api/tags", "/api/ps", "/v1/models", "/models", "/health", "/health/ready",
            "/health/upstreams", "/metrics", "/plugins", "/events", "/logs/<path:model>",
            "/ui", "/ui/", "/ui/<path:name>"]  # fmt: skip
#: Routes whose 200 is a stream that does not end by itself: its head and first piece are checked.
STREAMING = {"/events", "/logs/<path:model>"}
#: The method each rule is fuzzed with (the app's own, checked by test_every_route_is_fuzzed).
METHODS = {"/api/delete": "DELETE", **{path: "GET" for path in BODILESS}}
#: Routes that answer 501 by design.
NOT_SUPPORTED = {"/api/create", "/api/copy", "/api/push", "/api/blobs/<path:digest>"}

# ---- mutation and encoding ------------------------------------------------------------------


def _places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in ``value`` a value can be put or taken: the container and its key (or index)."""
    found: list[tuple] = []
    if isinstance(value, dict):
        found.append((path, None))  # a new key
        for key, child in value.items():
            found.append((path, key))
            found += _places(child, (*path, key))
    elif isinstance(value, list):
        found.append((path, len(value)))  # appended
        for index, child in enumerate(value):
            found.append((path, index))
            found += _places(child, (*path, index))
    return found


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated(draw: st.DrawFn, schema: st.SearchStrategy[dict]) -> Any:
    """A body of ``schema`` with up to three changes anywhere in it, or replaced whole."""
    body: Any = copy.deepcopy(draw(schema))  # drawn values may be shared (st.just, sampled_from): change a copy
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):  # a valid body as often as not
        places = _places(body)
        if not places:
            break
        path, key = draw(st.sampled_from(places))
        container = _at(body, path)
        action = draw(st.sampled_from(["replace", "replace", "delete"]))
        if key is None:
            name = draw(st.text(max_size=10) | st.sampled_from(["model", "stream", "options", "keep_alive"]))
            container[name] = copy.deepcopy(draw(VALUES))
        elif action == "delete" and isinstance(container, dict):
            del container[key]
        elif isinstance(container, list) and key == len(container):
            container.append(copy.deepcopy(draw(VALUES)))
        else:
            container[key] = copy.deepcopy(draw(VALUES))
    if draw(st.sampled_from([False] * 19 + [True])):
        body = draw(VALUES)  # not an object at all
    return body


def encode(body: Any, encoding: str, cut: int) -> bytes:
    raw = _MARKED.sub(lambda m: RAW[int(m.group(1))], json.dumps(body).encode())
    if encoding == "cut":
        return raw[: cut % (len(raw) + 1)]
    if encoding == "utf-8":
        return raw
    return raw.decode().encode(encoding)


ENCODINGS = st.sampled_from(["utf-8"] * 12 + ["utf-16", "utf-32", "utf-8-sig", "cut"])
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
        "X-Request-Id": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=140),
        "Accept": st.sampled_from(["*/*", "application/x-ndjson", "text/event-stream"]),
    },
)
QUERY = st.dictionaries(
    st.sampled_from(["format", "follow", "status"]) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=5),
    st.sampled_from(["json", "text", "1", "0"]) | st.text(max_size=5),
    max_size=2,
)

# ---- the property ---------------------------------------------------------------------------


def check_answer(rule: str, response: httpx.Response) -> None:
    """Under 500 (501 where the route says so), and an error in the route's dialect."""
    status = response.status_code
    if rule in NOT_SUPPORTED:
        assert status in (400, 401, 404, 413, 501), (status, response.text)
    else:
        assert status < 500, (status, response.text[:500])
    if status < 400:
        return
    body = response.json()
    if rule.startswith("/api/"):
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    elif rule.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert isinstance(body["error"]["type"], str) and body["error"]["type"], body
    else:
        error = body["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str) and error["code"] == status, body


async def check_healthy(http: httpx.AsyncClient, url: str) -> None:
    health = await http.get(url + "/health")
    assert health.status_code == 200, health.text
    json.loads(health.text, parse_constant=lambda name: pytest.fail(f"/health holds {name}"))
    ps = await http.get(url + "/api/ps")
    assert ps.status_code == 200, ps.text


def _errors(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.fixture
async def proxy_url(make_config, start_proxy, tmp_path) -> str:
    root = tmp_path / "agents"
    root.mkdir()
    copy_bundled(root, "json", "constrain = true\n")
    config = make_config(
        {"a": {"content": '{"ok": 1}', "load_delay": 0.01}, "e": {"content": "[1, 2]", "load_delay": 0.01},
         "r": {"load_delay": 0.01}},
        model_options={"a": {"embeddings": "true"}, "e": {"embeddings": "true"}, "r": {"rerank": "true"}},
        size=2,
    )
    return await start_proxy(with_agents(config, root, "json"))


@pytest.mark.parametrize("rule", [*SCHEMAS, *BODILESS])
async def test_fuzz_route(rule: str, proxy_url: str, http: httpx.AsyncClient, caplog) -> None:
    url = proxy_url
    caplog.set_level(logging.INFO)
    method = METHODS.get(rule, "POST")
    requests = (
        st.tuples(mutated(SCHEMAS[rule]), ENCODINGS, st.integers(0, 10**6), HEADERS, st.just({}))
        if rule in SCHEMAS
        else st.tuples(st.just(None), st.just("utf-8"), st.just(0), HEADERS, QUERY)
    )
    digests = st.sampled_from(["sha256:" + "0" * 64, "x", "..%2f..", "%00", "a", "e", "a/b", "app.js", "index.html"])

    async def send(path: str, content: bytes | None, headers: dict, query: dict) -> httpx.Response:
        with trio.fail_after(10):
            if rule not in STREAMING:
                return await http.request(method, url + path, content=content, headers=headers, params=query)
            request = http.build_request(method, url + path, content=content, headers=headers, params=query)
            response = await http.send(request, stream=True)
            try:
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    first = await anext(response.aiter_raw())
                    assert first.startswith((b"event: ", b": ")), first  # the snapshot, a line, or a comment
                else:
                    await response.aread()
            finally:
                await response.aclose()
            return response

    @SETTINGS
    @given(request=requests, digest=digests)
    def fuzz(request: tuple, digest: str) -> None:
        body, encoding, cut, headers, query = request
        path = rule.replace("<path:digest>", digest).replace("<path:model>", digest).replace("<path:name>", digest)
        content = None if body is None else encode(body, encoding, cut)
        seen = len(caplog.records)
        response = trio.from_thread.run(send, path, content, headers, query)
        check_answer(rule, response)
        assert not _errors(caplog.records[seen:]), (_errors(caplog.records[seen:]), content)
        if response.status_code < 300:  # an accepted request may change what others see
            trio.from_thread.run(check_healthy, http, url)

    with trio.fail_after(120):
        await trio.to_thread.run_sync(fuzz)
    await check_healthy(http, url)


async def test_every_route_is_fuzzed(make_config, start_pool, http, nursery) -> None:
    """A new route must join the fuzzing: the app's rules and the model routes are exactly what is fuzzed, with its methods."""
    from smart_proxy.web.routes import ROUTES

    from .asgi_driver import make_app

    app, _pool = await make_app(make_config, start_pool, http, nursery)
    rules = {rule.rule: rule.methods - {"HEAD", "OPTIONS"} for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert not set(rules) & set(ROUTES), "a model route is in the Quart app too"
    rules.update({path: {method} for path, (method, _handler) in ROUTES.items()})
    assert set(rules) == set(SCHEMAS) | set(BODILESS)
    for rule, methods in rules.items():
        assert METHODS.get(rule, "POST") in methods, rule
