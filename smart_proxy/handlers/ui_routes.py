"""The dashboard's routes: ``GET /ui``, ``/ui/`` and ``/ui/ASSET`` (docs/ui.md).

Theory of operation: the dashboard is three static files shipped in the package
(``smart_proxy/ui/``: ``index.html``, ``app.js``, ``app.css``; plain HTML, JavaScript and
CSS, no build step, nothing fetched from elsewhere). They are read once, on first use, and
kept in memory. The page itself needs no key, so that it can ask for one: every call it
makes goes to the proxy's existing routes (``/events``, ``/v1/models``, ``/logs/MODEL``,
``/api/generate``, ``/api/pull``, ``/v1/chat/completions``), which ask for the key as
always.

Every URL in the page is relative to the page, so the dashboard works behind a reverse
proxy that serves the proxy at a sub-path (``/llm/ui/`` with ``/llm/`` stripped). For that
reason ``/ui`` answers a redirect to ``ui/`` (a relative ``Location``): from ``/ui`` the
page's relative URLs would resolve one level too high.

Only the files of :data:`ASSETS` are served; any other name under ``/ui/`` is a 404, and
no name is ever joined to a filesystem path.
"""

from __future__ import annotations

import functools
from importlib import resources

from ..errors import ProxyError
from .reply import Reply, encode_headers

__all__ = ["ASSETS", "asset", "page", "redirect"]

#: The files served under ``/ui/``, with their content types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
#: The page and its files change only with the package; a browser revalidates each time.
_CACHE = "no-cache"
#: The page loads and calls nothing but the proxy's own URLs, and is framed by no other site
#: (its buttons load and unload models).
_POLICY = "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'"


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("smart_proxy").joinpath("ui", name).read_bytes()


def _not_found(name: str) -> ProxyError:
    error = ProxyError(f"no dashboard file {name[:80]!r}; the dashboard is at ui/")
    error.status, error.kind = 404, "not_found"
    return error


async def redirect() -> Reply:
    """``GET /ui``: a redirect to ``ui/``, relative, so that it holds at a sub-path too."""
    return Reply(308, encode_headers({"location": "ui/", "content-type": "text/plain; charset=utf-8"}), b"ui/\n")


async def page() -> Reply:
    """``GET /ui/``: the dashboard's page."""
    return await asset("index.html")


async def asset(name: str) -> Reply:
    """``GET /ui/NAME``: one of :data:`ASSETS`.

    Raises:
        ProxyError: 404, for a name that is not one of them.
    """
    content_type = ASSETS.get(name)
    if content_type is None:
        raise _not_found(name)
    headers = {
        "content-type": content_type,
        "cache-control": _CACHE,
        "x-content-type-options": "nosniff",
        "content-security-policy": _POLICY,
        "referrer-policy": "no-referrer",
    }
    return Reply(200, encode_headers(headers), _read(name))
