"""The ASGI connection Quart-Trio runs each HTTP request in, made cheaper per request.

Quart hands every HTTP request to its app's ``asgi_http_class``. Quart-Trio's
(``TrioASGIHTTPConnection``) opens a nursery with two tasks: one takes the ASGI
``receive`` messages (the request body, then ``http.disconnect``) and one runs the
handler and sends the answer; whichever ends first cancels the other, so a client
that leaves cancels its handler (which closes the upstream request and releases the
lease) and a finished answer stops the receiver. :class:`HTTPConnection` keeps that
theory and its semantics (``RESPONSE_TIMEOUT``, error handlers, streamed bodies) and
saves two pieces of per-request work that showed in profiles of the relay path:

* The handler runs in the connection's own task, as the body of the nursery, rather
  than in a second child task: one task spawned and retired per request instead of two.
  Cancelling the nursery (a disconnect seen by the receiver) cancels its body exactly as
  it cancelled the child.
* A body given as bytes (every non-streamed answer: a relayed JSON answer, an error)
  goes out as two ASGI messages, the start and one body message with
  ``more_body=False``, where Quart sends three (start, the body with ``more_body=True``,
  then an empty body to end it). Each message passes the edge middleware and
  Hypercorn's protocol layers. Any other body (a relayed stream, an iterable) is sent
  by Quart as before, one message per piece and an empty one at the end.
"""

from __future__ import annotations

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart.typing import ResponseTypes
from quart.utils import encode_headers
from quart.wrappers.response import DataBody, Response
from quart_trio.asgi import TrioASGIHTTPConnection

__all__ = ["HTTPConnection"]


class HTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection with the handler in the connection's task; see the module docstring."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        request = self._create_request_from_scope(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            # answers and cancels the nursery (the receiver) when done; a disconnect cancels it
            await self.handle_request(nursery, request, send)

    async def _send_response(self, send: ASGISendCallable, response: ResponseTypes) -> None:
        body = response.response if isinstance(response, Response) else None
        if not isinstance(body, DataBody):
            await super()._send_response(send, response)
            return
        data = body.data
        if body.begin != 0 or body.end != len(data):  # a range request made it partial
            data = data[body.begin : body.end]
        await send({"type": "http.response.start", "status": response.status_code, "headers": encode_headers(response.headers)})
        await send({"type": "http.response.body", "body": data, "more_body": False})

