"""The one JSON decoder for request bodies: strict, bounded, and failing only with BadRequest.

Every route reads its body with :func:`decode` (through
:func:`smart_proxy.dialects.openai.parse_body`), and so do the agents. What it accepts is
I-JSON (RFC 7493), a JSON text that every later step can use as it is:

* **UTF-8 only.** The bytes are decoded as strict UTF-8 first: ``json.loads`` on
  bytes would guess UTF-16 or UTF-32 from the first bytes, and take a byte order
  mark. Neither is JSON on the wire (RFC 8259 8.1).
* **Numbers that are numbers.** ``NaN``, ``Infinity`` and ``-Infinity`` (which
  Python's ``json`` accepts, and would write back into a translated body) are
  refused, so is a float that only fits as infinity (``1e999``), and an integer
  longer than the interpreter converts (``sys.get_int_max_str_digits``, 4300
  digits by default).
* **Strings that are text.** A ``\\ud800`` escape with no partner is valid JSON
  syntax but no Unicode character: it cannot be encoded again to be forwarded.
* **Bounded nesting** (:data:`MAX_DEPTH`): the stdlib decoder recurses per level
  and so does later code that copies or re-encodes a body (the agent chain, the
  Ollama translation); a body is refused before any of them sees it.

The checks that need a walk of the decoded value (depth, surrogates) run only when
a scan of the bytes, at C speed, says they could fail: a body with no more than
:data:`MAX_DEPTH` brackets cannot be nested deeper, and one with no ``\\uD8..``-
``\\uDF..`` escape cannot hold a surrogate (raw surrogate bytes are not UTF-8).
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from .errors import BadRequest

__all__ = ["MAX_DEPTH", "decode"]

#: The deepest nesting of arrays and objects a request body may have: far more than any API
#: body needs, and well inside what the recursive steps after decoding take (the stdlib's JSON
#: encoder, a frame a level of a recursion limit of 1000). The agent chain allows the same.
MAX_DEPTH = 256

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused(ValueError):
    """A number the decoder will not take (raised from inside the stdlib's scanner)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def decode(raw: bytes) -> Any:
    """``raw`` as JSON, checked as the module docstring says.

    Raises:
        BadRequest: not UTF-8, not JSON, or JSON this proxy does not take; the message says which.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8 text (byte {exc.start}): send JSON encoded as UTF-8") from None
    if text.startswith("\ufeff"):
        raise BadRequest("request body starts with a byte order mark: send JSON encoded as UTF-8, without one")
    try:
        value = _DECODER.decode(text)
    except _Refused as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except ValueError:  # the scanner's int() refused an integer over the interpreter's digit limit
        limit = sys.get_int_max_str_digits()
        raise BadRequest(f"request body holds an integer of more than {limit} digits, the most this proxy takes") from None
    deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    if deep or surrogates:
        _walk(value, surrogates)
    return value


def _too_deep() -> BadRequest:
    return BadRequest(f"request body nests more than {MAX_DEPTH} deep (arrays and objects); the most this proxy takes")


def _walk(value: Any, surrogates: bool) -> None:
    """Refuse ``value`` if it nests deeper than MAX_DEPTH or (``surrogates``) holds a lone surrogate."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            for key, child in item.items():
                if surrogates:
                    _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            stack.extend((child, depth + 1) for child in item)
        elif surrogates and isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    match = _SURROGATE.search(text)
    if match is not None:
        raise BadRequest(f"request body holds a lone surrogate (\\u{ord(match.group()):04x}) in a string: not Unicode text")
