"""The model catalog: what a requested model name means, and where its files are.

A name resolves to a :class:`~smart_proxy.config.ModelConfig`: a ``[model:NAME]`` section of
proxy.ini (``NAME:latest``, Ollama's default tag, matches too), or, only with
``[catalog] allow_hf = true``, an on-demand ``hf.co/ORG/REPO[:QUANT]`` name (Ollama's form) whose
repo matches ``[catalog] allow_repos``. A name that comes from a request is only ever looked up,
never used as a path: names that look like one (``/...``, ``../``, ``~``, ``*.gguf``) get 400, and a
repo id must be a plain ``ORG/NAME``.

A model's files (:meth:`Catalog.local_files`) are a local GGUF (``path``), a packaged one
(``path = package:NAME``: the package's ``assemble()`` gives it; assembling may write a file, so it
runs in a thread), or a Hugging Face repo's, which :class:`~smart_proxy.download.Downloads`
fetches into the HF cache. :meth:`Catalog.download` is the wait for that download; it returns at
once for local models and for files this process already has. :meth:`Catalog.start_download`
gives the same download to watch (``/api/pull`` streams its progress). With ``mmproj = auto``
the projector is the one :func:`~smart_proxy.download.find_projector` picks beside the GGUF: in its
folder for a local file (:func:`projector_beside`), in its repo for a Hugging Face model.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable

import attrs
import trio

from .config import AUTO_MMPROJ, PACKAGE_PREFIX, QUANT, CatalogConfig, ModelConfig, is_repo_id, resolve_path
from .download import (
    Download,
    DownloadFailure,
    Downloads,
    DownloadSnapshot,
    Hub,
    LocalFiles,
    find_projector,
    plan_from_cache,
    resolve,
)
from .errors import BadRequest, ModelNotAllowed, ModelNotFound, ProxyError
from .memory import model_estimate

__all__ = ["HF_PREFIXES", "Catalog", "LocalFiles", "describe", "parse_hf_name", "projector_beside"]

log = logging.getLogger(__name__)

#: Request names that mean "this Hugging Face repo" (the first is the canonical one).
HF_PREFIXES = ("hf.co/", "huggingface.co/")
_DRIVE = re.compile(r"^[A-Za-z]:")


def parse_hf_name(name: str) -> tuple[str, str | None]:
    """``hf.co/ORG/REPO:QUANT`` -> (``ORG/REPO``, ``QUANT``); ``:latest`` or no tag -> None.

    Raises:
        BadRequest: not ``ORG/REPO`` with an optional tag (``..``, extra ``/``, odd characters).
    """
    rest = name
    for prefix in HF_PREFIXES:
        if name.lower().startswith(prefix):
            rest = name[len(prefix) :]
            break
    repo, _, tag = rest.partition(":")
    if not is_repo_id(repo):
        raise BadRequest(f"model {name!r}: not a Hugging Face repo name; use hf.co/ORG/REPO or hf.co/ORG/REPO:QUANT")
    if tag.lower() in ("", "latest"):
        return repo, None
    if not QUANT.match(tag):
        raise BadRequest(f"model {name!r}: {tag!r} is not a quantization tag (e.g. Q4_K_M)")
    return repo, tag


def is_hf_name(name: str) -> bool:
    return name.lower().startswith(HF_PREFIXES)


def looks_like_path(name: str) -> bool:
    """A name that reads as a file path: a request must not get to name files."""
    parts = re.split(r"[/\\]", name)
    return (
        name.startswith(("/", "~", "."))
        or "\\" in name
        or "\0" in name
        or ".." in parts
        or _DRIVE.match(name) is not None
        or name.lower().endswith(".gguf")
    )


class Catalog:
    def __init__(
        self,
        models: dict[str, ModelConfig],
        base_dir: str = ".",
        config: CatalogConfig | None = None,
        downloads: Downloads | None = None,
    ) -> None:
        self._models = dict(models)
        self._base_dir = base_dir
        self._config = config or CatalogConfig()
        self._downloads = downloads

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return list(self._models)

    def find(self, name: str) -> ModelConfig | None:
        """The model proxy.ini calls ``name``; ``name:latest`` (Ollama's default tag) matches ``name`` too."""
        model = self._models.get(name)
        if model is None and name.endswith(":latest"):
            model = self._models.get(name.removesuffix(":latest"))
        return model

    def get(self, name: object) -> ModelConfig:
        """The model called ``name``.

        Raises:
            ModelNotFound: no such model (the message names some that exist).
            BadRequest: ``name`` looks like a file path, or is a malformed ``hf.co/`` name.
            ModelNotAllowed: an ``hf.co/`` name while allow_hf is off or its repo is not allowed.
        """
        model = self.find(name) if isinstance(name, str) else None
        if model is not None:
            return model
        if isinstance(name, str) and is_hf_name(name):
            return self._on_demand(name)
        if isinstance(name, str) and looks_like_path(name):
            raise BadRequest(f"model {name!r}: a model name is not a file path; name a model from the catalog")
        known = ", ".join(list(self._models)[:8]) or "none configured"
        raise ModelNotFound(f"model {name!r} not found; known models: {known}")

    def _on_demand(self, name: str) -> ModelConfig:
        repo, quant = parse_hf_name(name)
        if not self._config.allow_hf:
            raise ModelNotAllowed(
                f"model {name!r}: on-demand Hugging Face models are off; set [catalog] allow_hf = true "
                f"or add a [model:NAME] section with repo = {repo}"
            )
        if not any(fnmatch.fnmatchcase(repo.lower(), pattern.lower()) for pattern in self._config.allow_repos):
            raise ModelNotAllowed(f"model {name!r}: repo {repo} is not in [catalog] allow_repos")
        canonical = f"{HF_PREFIXES[0]}{repo}" + (f":{quant}" if quant else "")
        return ModelConfig(name=canonical, repo=repo, quant=quant)

    # ---- files -----------------------------------------------------------------------------

    async def download(self, model: ModelConfig) -> None:
        """Wait until a repo model's files are in the HF cache, downloading them if needed.

        Returns at once (without a checkpoint) for local models and for files already fetched.
        """
        if model.repo is not None and (self._downloads is None or self._downloads.local(model) is None):
            await self._require_downloads().fetch(model)

    def start_download(self, model: ModelConfig) -> Download:
        """The download :meth:`download` would wait for, started if need be, to watch as it runs."""
        if model.repo is None:
            raise ValueError(f"model {model.name!r} is a local file: there is nothing to download")
        return self._require_downloads().start(model)

    async def local_files(self, model: ModelConfig) -> LocalFiles:
        """What llama-server loads for ``model``: its GGUF, ``--mmproj`` if it has one, and its ``chat_template``."""
        files = await self._model_files(model)
        if model.chat_template:
            files = attrs.evolve(files, chat_template=str(resolve_path(model.chat_template, self._base_dir)))
        return files

    async def _model_files(self, model: ModelConfig) -> LocalFiles:
        if model.repo is not None:
            return await self._require_downloads().fetch(model)
        assert model.path is not None
        if model.path.startswith(PACKAGE_PREFIX):
            module = importlib.import_module(model.path.removeprefix(PACKAGE_PREFIX))
            path = str(await trio.to_thread.run_sync(module.assemble))
        else:
            path = str(resolve_path(model.path, self._base_dir))
        if model.mmproj == AUTO_MMPROJ:
            mmproj = await trio.to_thread.run_sync(projector_beside, path)
        else:
            mmproj = str(resolve_path(model.mmproj, self._base_dir)) if model.mmproj else None
        return LocalFiles(model=path, mmproj=mmproj, parts=(path,) + ((mmproj,) if mmproj else ()))

    async def projector(self, model: ModelConfig) -> str | None:
        """The projector ``mmproj = auto`` finds for ``model`` among its files here, fetching nothing.

        None when there is none, or when a Hugging Face model is not downloaded yet.
        """
        try:
            path = await self.gguf_path(model)
        except ProxyError:
            return None
        return await trio.to_thread.run_sync(projector_beside, path)

    async def gguf_path(self, model: ModelConfig) -> str:
        """The GGUF file a model loads from (the first part of a split one), to read it, never to fetch it.

        Raises:
            ModelNotFound: a Hugging Face model that is not in the cache yet (looking must not
                download gigabytes; the first request or ``smart-proxy pull`` does that).
        """
        if model.repo is None:
            return (await self.local_files(model)).model
        files = self._downloads.local(model) if self._downloads is not None else None
        if files is not None:
            return files.model
        hub = self._downloads.hub if self._downloads is not None else Hub.from_env()
        plan = await trio.to_thread.run_sync(plan_from_cache, model, hub)
        if plan is None or plan.snapshot is None:
            raise ModelNotFound(f"model {model.name!r}: {model.repo} is not downloaded yet")
        return os.path.join(plan.snapshot, plan.model[0].name)

    def downloading(self) -> tuple[DownloadSnapshot, ...]:
        """Downloads in flight, for the pool's snapshot and /health."""
        return self._downloads.snapshot() if self._downloads is not None else ()

    def download_of(self, model: ModelConfig) -> DownloadSnapshot | None:
        """The download of ``model``'s files in flight now, if any (never for a local file)."""
        if model.repo is None or self._downloads is None:
            return None
        return self._downloads.in_flight(model)

    def download_failure(self, model: ModelConfig) -> DownloadFailure | None:
        """Why the latest download of ``model``'s files failed, if it did and none has started since."""
        if model.repo is None or self._downloads is None:
            return None
        return self._downloads.last_failure(model)

    def _require_downloads(self) -> Downloads:
        if self._downloads is None:
            raise RuntimeError("this Catalog has no Downloads service, so it cannot fetch Hugging Face models")
        return self._downloads


def describe(model: ModelConfig, base_dir: str, hub: Hub) -> dict[str, object]:
    """One row of ``smart-proxy models``: name, source, size (bytes or None), local, files, and
    memory: what one llama-server of it holds (its ``memory``, else the estimate; None until its files are here).
    """
    row: dict[str, object] = {"name": model.name}
    if model.backend == "ollama":
        return {**row, "source": f"ollama {model.url}", "size": None, "local": None, "files": [], "memory": None}
    if model.repo is None:
        assert model.path is not None
        if model.path.startswith(PACKAGE_PREFIX):
            package = model.path.removeprefix(PACKAGE_PREFIX)
            installed = importlib.util.find_spec(package) is not None
            memory = _memory(model, lambda: [str(importlib.import_module(package).assemble())]) if installed else None
            return {**row, "source": model.path, "size": None, "local": installed, "files": [], "memory": memory}
        paths = [str(resolve_path(model.path, base_dir))]
        if model.mmproj == AUTO_MMPROJ:
            paths += [found] if (found := projector_beside(paths[0])) else []
        elif model.mmproj:
            paths.append(str(resolve_path(model.mmproj, base_dir)))
        sizes = [os.path.getsize(p) for p in paths if os.path.isfile(p)]
        memory = _memory(model, lambda: paths[:1], paths[1] if len(paths) > 1 else None)
        local = len(sizes) == len(paths)
        return {**row, "source": paths[0], "size": sum(sizes), "local": local, "files": paths, "memory": memory}
    source = f"hf.co/{model.repo} " + (f"file {model.file}" if model.file else f"quant {model.quant or 'default'}")
    source += f" @{model.revision}" if model.revision else ""
    source += f" + mmproj {model.mmproj}" if model.mmproj else ""
    try:
        plan = resolve(model, hub)
    except ProxyError as exc:
        return {**row, "source": source, "size": None, "local": False, "files": [], "error": exc.message, "memory": None}
    local = plan.from_cache or all(hub.has(plan.repo, f) for f in plan.files)
    memory = model.memory
    cached = plan if plan.snapshot is not None or not local else plan_from_cache(model, hub)
    if cached is not None and cached.snapshot is not None:
        snapshot, parts = cached.snapshot, [f.name for f in cached.model]
        mmproj = os.path.join(snapshot, cached.mmproj.name) if cached.mmproj else None
        memory = _memory(model, lambda: [os.path.join(snapshot, name) for name in parts], mmproj)
    return {**row, "source": source, "size": plan.size, "local": local, "files": [f.name for f in plan.files], "memory": memory}


def _memory(model: ModelConfig, parts: Callable[[], list[str]], mmproj: str | None = None) -> int | None:
    """The bytes one llama-server of ``model`` holds, or None if its files cannot be read."""
    try:
        return model_estimate(model, parts(), mmproj).total
    except (OSError, ImportError, AttributeError) as exc:
        log.debug("%s: no memory estimate: %s", model.name, exc)
        return model.memory


def projector_beside(path: str) -> str | None:
    """The projector in the folder of the GGUF ``path`` (``mmproj*.gguf``, chosen as ``-hf`` chooses), or None."""
    folder, name = os.path.split(path)
    try:
        names = sorted(entry.name for entry in os.scandir(folder or ".") if entry.is_file())
    except OSError:
        return None
    found = find_projector(names, name)
    return os.path.join(folder, found) if found else None
