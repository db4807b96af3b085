# smart-proxy: a Trio smart proxy for local LLMs. It resolves a requested model through the
# catalog in proxy.ini, runs llama-servers in a fixed-size pool, speaks the OpenAI and the
# Ollama APIs, and runs slash-command agents on requests and responses.

from .catalog import Catalog
from .config import Config, load_config
from .errors import (
    BadRequest,
    ConfigError,
    ModelLoadFailed,
    ModelLoadTimeout,
    ModelNotFound,
    PoolBusy,
    ProxyError,
    UpstreamError,
)
from .pool import Lease, Pool
from .server import serve

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Catalog",
    "Config",
    "ConfigError",
    "Lease",
    "ModelLoadFailed",
    "ModelLoadTimeout",
    "ModelNotFound",
    "Pool",
    "PoolBusy",
    "ProxyError",
    "UpstreamError",
    "__version__",
    "load_config",
    "serve",
]
