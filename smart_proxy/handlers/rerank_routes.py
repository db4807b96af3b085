"""Reranking over the pool: ``POST /v1/rerank``, ``/rerank``, ``/v1/reranking`` and ``/reranking``.

Theory of operation: llama-server answers these four paths itself when started with
``--reranking``, which the pool does for a model with ``rerank = true`` in its
``[model:NAME]`` section. :func:`rerank` checks the body once (a JSON object naming
``model`` and carrying ``query``), refuses a model that is not a reranker with a 400
that says how to make it one, and relays the request byte for byte to a llama-server
for the model, on the path it came on, and the whole answer back as llama-server gives
it: Jina's and Cohere's shape (``query``, ``documents``, ``top_n`` -> ``results`` of
``index`` and ``relevance_score``), or TEI's (``texts`` -> a list of ``index`` and ``score``).
"""

from __future__ import annotations

from ..dialects import openai as dialect
from ..errors import BadRequest
from ..metrics import note_model
from . import fleet
from .openai_routes import open_relay
from .reply import Reply, Request, merge_headers
from .state import ProxyState

__all__ = ["ROUTES", "rerank"]

#: The routes :func:`rerank` serves (``POST``), as llama-server names them.
ROUTES = ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")


async def rerank(proxy: ProxyState, request: Request) -> Reply:
    """Rerank ``documents`` by their relevance to ``query`` with a reranker model; see the module docstring.

    Raises:
        BadRequest: the body is not a JSON object, lacks ``model`` or ``query``, or the
            model is not a reranker (``rerank = true``).
        ModelNotFound, ModelNotAllowed: as :meth:`smart_proxy.catalog.Catalog.get`.
        ProxyError: whatever loading the model or reaching its llama-server raised.
    """
    payload = dialect.parse_body(request.body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("missing 'model': name the model to use")
    if "query" not in payload:
        raise BadRequest("missing 'query'")
    return await fleet.serve(proxy, request, model, lambda: _here(proxy, request, model))


async def _here(proxy: ProxyState, request: Request, model: str) -> Reply:
    """:func:`rerank` served by this proxy's pool."""
    target = proxy.catalog.get(model)
    note_model(target.name)
    if target.backend == "ollama":
        raise BadRequest(f"model {target.name!r} is served by an Ollama upstream, which has no rerank route")
    if not target.rerank:
        raise BadRequest(
            f"model {target.name!r} is not a reranker: set rerank = true in its [model:{target.name}] section "
            "(llama-server --reranking) to rerank with it"
        )
    lease, upstream = await open_relay(proxy, request.path, target.name, request.body)
    request.opened.append(upstream)
    try:
        answer = await upstream.read(proxy.config.proxy.max_answer)
    finally:
        lease.release()
    headers = upstream.headers
    wrapped = dialect.upstream_error_body(upstream.status_code, answer)
    if wrapped is not None:
        answer, headers["content-type"] = wrapped, "application/json"
    return Reply(upstream.status_code, merge_headers(headers), answer)
