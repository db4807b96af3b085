"""/json: make the answer valid JSON; shows a response hook.

On the way in (chat only, ``constrain = true``, and no ``response_format`` of the
client's) it asks llama-server for ``response_format: json_object``, which
constrains sampling to JSON. On the way out it checks each choice's text: valid
JSON is left exactly as it is; otherwise :func:`repair` tries, in order, the text
inside a markdown code fence, the span from the first ``{``/``[``, single-quoted
strings, Python's ``True``/``False``/``None``, trailing commas, and an answer cut
off mid-way (``max_tokens``), closing its open strings and brackets and dropping a
dangling member. A repaired answer is replaced by its compact JSON. Text that
cannot be repaired makes the hook raise, so the chain skips it: the client gets
the model's text unchanged and the ``X-Smart-Proxy-Agent-Errors`` header names
``json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from smart_proxy.agents import Agent, AgentContext

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_LITERALS = {"True": "true", "False": "false", "None": "null"}
_CLOSERS = {"{": "}", "[": "]"}


def repair(text: str) -> Any:
    """The JSON value ``text`` holds, or what it most plausibly meant; ValueError if none.

    >>> repair("```json\\n{'a': True, 'b': [1, 2,],}\\n```")
    {'a': True, 'b': [1, 2]}
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    fenced = _FENCE.search(text)
    if fenced is not None:
        text = fenced.group(1)
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError("no JSON object or array in the answer")
    normal, complete = _normalize(text[min(starts) :])
    attempts = [normal] if complete else _closings(normal)
    for attempt in attempts:
        try:
            return json.loads(attempt)
        except ValueError:
            continue
    raise ValueError("the answer is not JSON and could not be repaired")


def _normalize(text: str) -> tuple[str, bool]:
    """One pass over the text: JSON-quote strings, map Python literals, drop trailing commas.

    Stops after the bracket that closes the first one (prose after the JSON is
    ignored). Returns the text and whether its first bracket was closed.
    """
    out: list[str] = []
    stack: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in "\"'":
            string, i = _read_string(text, i)
            out.append(string)
            continue
        if char in "{[":
            stack.append(char)
        elif char in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()  # a trailing comma
            if stack:
                stack.pop()
            out.append(char)
            i += 1
            if not stack:
                return "".join(out), True
            continue
        elif char.isalpha():
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(_LITERALS.get(word, word))
            i = j
            continue
        out.append(char)
        i += 1
    return "".join(out), False


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The string starting at ``start`` as a JSON string (closed if the text ends inside it)."""
    quote = text[start]
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            chars.append(nxt if (quote == "'" and nxt == "'") else char + nxt)
            i += 2
            continue
        if char == quote:
            i += 1
            break
        if char == '"':  # only possible inside a single-quoted string
            chars.append('\\"')
        elif char == "\n":
            chars.append("\\n")
        else:
            chars.append(char)
        i += 1
    return '"' + "".join(chars) + '"', i


def _closings(text: str) -> list[str]:
    """Ways to finish a cut-off answer: close what is open, or first drop its last member."""
    attempts = []
    body = text.rstrip()
    for _ in range(8):
        trimmed = body.rstrip().rstrip(",:").rstrip()
        attempts.append(trimmed + "".join(_CLOSERS[b] for b in reversed(_open_brackets(trimmed))))
        cut = _last_separator(body)
        if cut < 0:
            break
        body = body[:cut]
    return attempts


def _open_brackets(text: str) -> list[str]:
    stack: list[str] = []
    in_string = False
    i = 0
    while i < len(text):
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
        i += 1
    return stack


def _last_separator(text: str) -> int:
    """Index of the last ``,`` (or opening bracket) outside strings; -1 if none."""
    last = -1
    in_string = False
    i = 0
    while i < len(text):
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == ",":
            last = i
        elif char in "{[" and i > 0:
            last = i + 1
        i += 1
    return last


class Json(Agent):
    description = "Valid JSON out: asks for JSON, then validates the answer and repairs it (fences, quotes, cut-offs)"

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        super().__init__(config, folder)
        self.constrain = bool(config.get("constrain", True))

    async def on_request(self, ctx: AgentContext) -> None:
        if self.constrain and ctx.kind == "chat" and "response_format" not in ctx.payload:
            ctx.payload["response_format"] = {"type": "json_object"}

    async def on_response(self, ctx: AgentContext) -> None:
        assert ctx.response is not None
        key = "text" if ctx.kind == "completion" else None
        for choice in ctx.response.get("choices") or []:
            holder = choice if key else choice.get("message") or {}
            text = holder.get(key or "content")
            if not isinstance(text, str):
                continue
            try:
                json.loads(text)
                continue  # already valid: not a byte changes
            except ValueError:
                pass
            holder[key or "content"] = json.dumps(repair(text), ensure_ascii=False)
