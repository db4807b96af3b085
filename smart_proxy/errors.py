"""The errors smart-proxy raises, each carrying the HTTP status it maps to.

The API layer renders them in the caller's dialect (an OpenAI error object, or
Ollama's ``{"error": ...}``); nothing else needs to know about HTTP.

    ProxyError                      500  base class; never raised as such
    ├── BadRequest                  400  malformed JSON, missing fields, a model name that is a path
    ├── Unauthorized                401  API keys are configured and none valid was sent
    ├── ModelNotAllowed             403  an hf.co/... name outside [catalog] allow_hf / allow_repos
    ├── ModelNotFound               404  a name the catalog does not know; no such repo or file on the hub
    ├── BodyTimeout                 408  the request body did not arrive in time
    ├── PayloadTooLarge             413  a request body over [proxy] max_body
    ├── PoolBusy                    503  queue full or queue timeout (has retry_after)
    ├── ShuttingDown                503  the proxy is draining after SIGTERM (has retry_after)
    ├── UpstreamError               502  llama-server or an upstream unreachable / broke
    │   ├── UpstreamRefused         502  the connection was refused: nothing was sent
    │   └── ModelLoadFailed         502  llama-server exited or failed while loading
    ├── ModelLoadTimeout            504  llama-server not ready within load_timeout
    ├── UpstreamTimeout             504  no first byte of an answer within request_timeout
    ├── InsufficientStorage         507  no room on disk for a model download
    └── ModelTooLarge               507  a model that cannot fit in the pool's memory budget even with
                                         every other server stopped (never queued: waiting cannot help)

ConfigError is separate: it stops start-up and is never sent to a client.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "BodyTimeout",
    "ConfigError",
    "InsufficientStorage",
    "ModelLoadFailed",
    "ModelLoadTimeout",
    "ModelNotAllowed",
    "ModelNotFound",
    "ModelTooLarge",
    "PayloadTooLarge",
    "PoolBusy",
    "ProxyError",
    "ShuttingDown",
    "Unauthorized",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "too_large",
]


class ConfigError(Exception):
    """proxy.ini (or the command line) is wrong; the message names section and key."""


class ProxyError(Exception):
    """An error a client sees: ``status`` is the HTTP status, ``kind`` a short type name."""

    status = 500
    kind = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProxyError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    kind = "invalid_api_key"


class ModelNotAllowed(ProxyError):
    status = 403
    kind = "model_not_allowed"


class ModelNotFound(ProxyError):
    status = 404
    kind = "model_not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    kind = "request_too_large"


class BodyTimeout(ProxyError):
    """The request body did not arrive in time."""

    status = 408
    kind = "invalid_request_error"


class PoolBusy(ProxyError):
    status = 503
    kind = "server_busy"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(ProxyError):
    status = 503
    kind = "shutting_down"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(ProxyError):
    status = 502
    kind = "upstream_error"


class UpstreamRefused(UpstreamError):
    """The upstream refused the connection, so nothing was sent: the request may go again."""


class ModelLoadFailed(UpstreamError):
    kind = "model_load_failed"


class ModelLoadTimeout(ProxyError):
    status = 504
    kind = "model_load_timeout"


class UpstreamTimeout(ProxyError):
    status = 504
    kind = "upstream_timeout"


class InsufficientStorage(ProxyError):
    status = 507
    kind = "insufficient_storage"


class ModelTooLarge(ProxyError):
    """The model needs more memory than ``[pool] memory`` leaves it: refused at once, not queued.

    507 rather than 503: 503 says "busy, retry later", and a retry cannot succeed until
    the configuration (or the pinned models) changes.
    """

    status = 507
    kind = "insufficient_memory"


def too_large(limit: int) -> PayloadTooLarge:
    """The error for a request body over ``[proxy] max_body``."""
    return PayloadTooLarge(f"request body too large: the limit is {limit} bytes ([proxy] max_body)")
