"""Optional API keys: ``[proxy] api_keys`` and ``[proxy] api_key_file``.

With no key configured every request is let through. With keys, a request must
carry one as ``Authorization: Bearer KEY`` (OpenAI SDKs) or ``x-api-key: KEY``;
the edge middleware checks it before any route runs and answers 401 in the
caller's dialect. Probes stay public. Keys are compared in constant time and
never written to a log or an error message.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from .config import ProxyConfig, resolve_path
from .errors import ConfigError, Unauthorized

__all__ = ["ApiKeys"]


class ApiKeys:
    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(key.encode() for key in dict.fromkeys(keys) if key)

    @classmethod
    def from_config(cls, proxy: ProxyConfig, base_dir: str = ".") -> ApiKeys:
        """``api_keys`` plus the lines of ``api_key_file``.

        Raises:
            ConfigError: the key file cannot be read or holds no key.
        """
        keys = list(proxy.api_keys)
        if proxy.api_key_file:
            path = resolve_path(proxy.api_key_file, base_dir)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"[proxy] api_key_file: cannot read {path}: {exc.strerror}") from None
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise ConfigError(f"[proxy] api_key_file: no keys in {path} (one key a line)")
            keys += from_file
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def any(self) -> str | None:
        """One of the keys (for the proxy's own requests to itself), or None when none is set."""
        return self._keys[0].decode() if self._keys else None

    def check(self, authorization: str | None, x_api_key: str | None) -> None:
        """Return if the headers carry a valid key (or none is required); else raise Unauthorized."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        offered = (token.strip() if scheme.lower() == "bearer" else "") or (x_api_key or "").strip()
        if not offered:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        given = offered.encode()
        # every key is compared, so the time taken does not tell which one nearly matched
        if not sum(hmac.compare_digest(given, key) for key in self._keys):
            raise Unauthorized("invalid API key")
