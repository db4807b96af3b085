"""Reading a Server-Sent Events stream in tests, as a browser's EventSource would (comments kept apart)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio


class SSEReader:
    """The events of a streamed httpx response: ``await reader.next()`` -> (event, data as JSON)."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()
        #: Comment lines seen (without the colon), in order.
        self.comments: list[str] = []

    async def next(self, wait: float = 10.0) -> tuple[str, Any]:
        kind, data = "message", []
        with trio.fail_after(wait):
            async for line in self._lines:
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    return kind, json.loads("\n".join(data))
        raise EOFError("the stream ended")

    async def until(self, wanted: str, wait: float = 10.0, **fields: Any) -> tuple[list[tuple[str, Any]], Any]:
        """Events up to the first ``wanted`` one whose data has ``fields``: (all seen, that one's data)."""
        seen = []
        with trio.fail_after(wait):
            while True:
                kind, data = await self.next(wait)
                seen.append((kind, data))
                if kind == wanted and all(data.get(k) == v for k, v in fields.items()):
                    return seen, data
