"""Hugging Face downloads: a repo model's GGUF files, fetched once into the standard HF cache.

Theory of operation:

* A :class:`~smart_proxy.config.ModelConfig` with ``repo`` says *which* files it wants: a ``file``
  name or glob, a ``quant`` tag, or neither (llama.cpp's default: Q4_K_M, then Q8_0, then the first
  GGUF), plus an optional ``mmproj`` (a name or glob, or ``auto``: the projector
  :func:`find_projector` picks, as ``-hf`` does). :func:`resolve` asks the hub for the repo's file list (one
  ``model_info`` call, with sizes and sha256s) and picks the files the way ``llama-server -hf
  repo:quant`` does, every part of a split GGUF included: a :class:`Plan`. When the hub cannot be
  asked (``HF_HUB_OFFLINE``, or it is unreachable or failing), the plan is made from what the cache
  holds for that revision instead, so a warm cache keeps working offline.
* :func:`fetch` downloads the plan's files with ``hf_hub_download`` into the HF cache, so every
  tool shares it (``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` mean
  what they mean to huggingface_hub). huggingface_hub writes each file under a temporary name and
  renames it into place only when its size is right; a file we have just downloaded is then checked
  against the hub's sha256 (git's sha1 for small files) and removed if it does not match. So a
  partial or corrupt file never reaches llama-server. Free disk space is checked up front from the
  planned sizes. Both functions block: the proxy runs them in worker threads, ``smart-proxy pull``
  calls them directly.
* :class:`Downloads` is the async side, a service in the root nursery. :meth:`Downloads.fetch`
  coalesces per model spec (repo, revision, file/quant, mmproj): however many requests want it, one
  :class:`Download` in the service's nursery resolves and downloads it, and the requests wait for
  the outcome. :meth:`Downloads.start` hands out that :class:`Download` itself, for a caller that
  wants to watch it (``/api/pull`` streams its :meth:`Download.status` as Ollama's progress).
  huggingface_hub's per-blob file lock keeps two specs that share a file from fetching it twice.
  A request that leaves only stops waiting. When every request has left, the download still runs
  to the end: the file is what the next request will want, and stopping a transfer that is half
  done only wastes it. Shutdown cancels it; the worker thread notices at its next chunk and
  huggingface_hub deletes its temporary file.
* Failures are reported to every waiter and not remembered: the next request tries again. No such
  repo, revision or file -> ModelNotFound (404); hub or network failure, or a corrupt file ->
  UpstreamError (502); a full disk -> InsufficientStorage (507).
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio

from .config import AUTO_MMPROJ, ModelConfig, is_repo_pattern
from .errors import InsufficientStorage, ModelNotFound, ProxyError, UpstreamError
from .eventbus import EventBus

__all__ = [
    "DEFAULT_QUANTS",
    "Download",
    "DownloadCancelled",
    "DownloadFailure",
    "DownloadSnapshot",
    "DownloadStatus",
    "Downloads",
    "FileStatus",
    "Hub",
    "LocalFiles",
    "Plan",
    "Progress",
    "RepoFile",
    "fetch",
    "find_projector",
    "plan_from_cache",
    "resolve",
    "select",
    "hub_error",
]

log = logging.getLogger(__name__)

#: What llama.cpp picks when no quant is named, in order; then the first model GGUF.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
#: GGUFs that ride along with a model rather than being one (llama.cpp's gguf_filename_is_model).
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})\.gguf$", re.IGNORECASE)
#: A GGUF name's quantization tag: its last ``-`` or ``.`` separated word (llama.cpp's get_gguf_split_info).
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
#: How long shutdown waits for a worker thread to drop its download and clean up.
_STOP_GRACE = 5.0
#: Seconds between ``download`` events of a download in flight (when its bytes or stage changed).
_REPORT_EVERY = 0.5
_LOG_EVERY = 10.0
_HASH_BLOCK = 4 * 1024 * 1024


# ---- where models come from and go to ----------------------------------------------------


@attrs.frozen
class Hub:
    """The hub and the cache, read from the environment the way huggingface_hub reads it."""

    cache_dir: str
    #: ``HF_ENDPOINT``; None means huggingface_hub's default (https://huggingface.co).
    endpoint: str | None = None
    #: ``HF_HUB_OFFLINE``: never ask the hub, use only what the cache holds.
    offline: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Hub:
        env = dict(os.environ if environ is None else environ)
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache:
            xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            cache = os.path.join(env.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().upper() in _TRUE
        endpoint = (env.get("HF_ENDPOINT") or "").rstrip("/") or None
        return cls(cache_dir=os.path.expanduser(os.path.expandvars(cache)), endpoint=endpoint, offline=offline)

    def repo_dir(self, repo: str) -> Path:
        """``models--ORG--NAME`` in the cache (``repo`` is a checked repo id, never a path)."""
        return Path(self.cache_dir) / ("models--" + repo.replace("/", "--"))

    def has(self, repo: str, file: RepoFile) -> bool:
        """Whether the cache holds this file's content (its blob, named by its hash)."""
        return file.etag is not None and (self.repo_dir(repo) / "blobs" / file.etag).is_file()


@attrs.frozen
class RepoFile:
    """One file of a repo, as the hub (or the cache) describes it."""

    name: str
    size: int | None = None
    #: The LFS sha256: the blob's name in the cache, and what the content must hash to.
    sha256: str | None = None
    #: The git blob id (sha1) of a small, non-LFS file.
    blob_id: str | None = None

    @property
    def etag(self) -> str | None:
        return self.sha256 or self.blob_id


@attrs.frozen
class Plan:
    """The concrete files a model spec means, at one revision of one repo."""

    repo: str
    revision: str
    #: The GGUF; every part of a split one, first part first.
    model: tuple[RepoFile, ...]
    mmproj: RepoFile | None = None
    #: The commit the hub resolved ``revision`` to (None when it is not known).
    commit: str | None = None
    #: Made from the cache because the hub could not be asked: the files are already local.
    from_cache: bool = False
    #: Where the cached files are when ``from_cache``.
    snapshot: str | None = None

    @property
    def files(self) -> tuple[RepoFile, ...]:
        return self.model + ((self.mmproj,) if self.mmproj is not None else ())

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


@attrs.frozen
class LocalFiles:
    """What llama-server loads: the GGUF (the first part of a split one) and an mmproj."""

    model: str
    mmproj: str | None = None
    #: Every file, split parts and mmproj included.
    parts: tuple[str, ...] = ()
    #: A Jinja chat template file to use instead of the GGUF's own.
    chat_template: str | None = None

    def args(self) -> tuple[str, ...]:
        """llama-server arguments beyond ``-m``."""
        args = ("--mmproj", self.mmproj) if self.mmproj else ()
        if self.chat_template:
            args += ("--jinja", "--chat-template-file", self.chat_template)
        return args

    def exist(self) -> bool:
        return all(os.path.exists(path) for path in (self.parts or (self.model,)))


# ---- choosing files, as llama-server -hf does ----------------------------------------------


def split_info(name: str) -> tuple[str, int, int]:
    """``x-Q4_K_M-00002-of-00003.gguf`` -> (``x-Q4_K_M``, 2, 3); a whole file -> (stem, 1, 1)."""
    match = _SPLIT.match(name)
    if match is None:
        return name.removesuffix(".gguf"), 1, 1
    return match.group(1), int(match.group(2)), int(match.group(3))


def is_model_gguf(name: str) -> bool:
    base = _base(name)
    return base.endswith(".gguf") and not any(word in base for word in _NOT_MODELS)


def _split_set(files: list[RepoFile], primary: RepoFile, repo: str) -> tuple[RepoFile, ...]:
    """Every part of ``primary``'s split GGUF in order (just ``primary`` if it is whole)."""
    prefix, _, count = split_info(primary.name)
    if count == 1:
        return (primary,)
    parts = {}
    for f in files:
        f_prefix, index, f_count = split_info(f.name)
        if f_prefix == prefix and f_count == count:
            parts[index] = f
    missing = [i for i in range(1, count + 1) if i not in parts]
    if missing:
        numbers = ", ".join(map(str, missing))
        raise ModelNotFound(f"split GGUF {prefix} in Hugging Face repo {repo!r} lacks part(s) {numbers} of {count}")
    return tuple(parts[i] for i in range(1, count + 1))


def _quant_bits(name: str) -> int:
    """The bits of a GGUF name's quantization tag: ``x-Q4_K_M.gguf`` -> 4, ``mmproj-F16.gguf`` -> 16, none -> 0."""
    tag = _TAG.search(split_info(name)[0])
    digits = re.match(r"\D*(\d+)", tag.group(1)) if tag else None
    return int(digits.group(1)) if digits else 0


def find_projector(names: list[str], model: str) -> str | None:
    """The projector llama.cpp's ``-hf`` would load with the GGUF ``model``, among ``names``; None if there is none.

    As llama.cpp's ``find_best_mmproj`` picks it: a ``.gguf`` whose path contains ``mmproj``, in
    the model's folder or a folder above it; the deepest such folder first, then the quantization
    closest in bits to the model's (an F16 projector for an F16 model, Q8_0 for Q8_0); the first
    listed among equals. ``names`` and ``model`` are ``/``-separated paths relative to one root.
    """
    model_dir = model.split("/")[:-1]
    model_bits = _quant_bits(model)
    best: tuple[int, int] | None = None  # (-depth, bits difference): smaller is better
    found = None
    for name in names:
        if not name.endswith(".gguf") or "mmproj" not in name:
            continue
        folder = name.split("/")[:-1]
        if folder != model_dir[: len(folder)]:
            continue  # not the model's folder nor one above it
        rank = (-len(folder), abs(_quant_bits(name) - model_bits))
        if best is None or rank < best:
            best, found = rank, name
    return found


def _matching(files: list[RepoFile], pattern: str) -> list[RepoFile]:
    """Files named ``pattern`` (case-insensitive, as llama.cpp compares) or matching it as a glob."""
    exact = [f for f in files if f.name.lower() == pattern.lower()]
    if exact:
        return exact
    return [f for f in files if fnmatch.fnmatchcase(f.name, pattern) or fnmatch.fnmatchcase(_base(f.name), pattern)]


def _base(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _available(files: list[RepoFile]) -> str:
    names = [f.name for f in files if f.name.endswith(".gguf")]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"GGUF files there: {shown}" if names else "it has no GGUF files"


def _first_parts(files: list[RepoFile]) -> list[RepoFile]:
    return [f for f in files if is_model_gguf(f.name) and split_info(f.name)[1] == 1]


def select(files: list[RepoFile], model: ModelConfig) -> tuple[tuple[RepoFile, ...], RepoFile | None]:
    """The model's GGUF (all parts) and mmproj among ``files``; ModelNotFound naming what is missing.

    ``file`` is a name or a glob; ``quant`` is found like llama.cpp's ``find_best_model``: the first
    model GGUF (first part, if split) whose path contains the tag followed by ``.`` or ``-``, case
    aside. With neither, Q4_K_M, then Q8_0, then the first model GGUF.
    """
    assert model.repo is not None
    repo = model.repo
    files = [f for f in files if is_repo_pattern(f.name)]  # nothing from the hub may climb out
    if model.file is not None:
        found = _matching(files, model.file)
        if not found:
            raise ModelNotFound(f"no file {model.file!r} in Hugging Face repo {repo!r}; {_available(files)}")
        ggufs = [f for f in found if f.name.endswith(".gguf")] or found
        primary = next((f for f in ggufs if split_info(f.name)[1] == 1), ggufs[0])
        if len({split_info(f.name)[0] for f in ggufs}) > 1:
            log.warning("%s: file = %s matches several GGUFs in %s; using %s", model.name, model.file, repo, primary)
    else:
        tags = (model.quant,) if model.quant else DEFAULT_QUANTS
        candidates = _first_parts(files)
        primary = None
        for tag in tags:
            pattern = re.compile(re.escape(tag) + r"[.-]", re.IGNORECASE)
            primary = next((f for f in candidates if pattern.search(f.name)), None)
            if primary is not None:
                break
        if primary is None and not model.quant and candidates:
            primary = candidates[0]
        if primary is None:
            what = f"no {model.quant} GGUF" if model.quant else "no GGUF model file"
            raise ModelNotFound(f"{what} in Hugging Face repo {repo!r}; {_available(files)}")
    parts = _split_set(files, primary, repo)
    mmproj = None
    if model.mmproj == AUTO_MMPROJ:
        name = find_projector([f.name for f in files], primary.name)
        mmproj = next((f for f in files if f.name == name), None)
    elif model.mmproj is not None:
        found = _matching(files, model.mmproj)
        if not found:
            available = _available(files)
            raise ModelNotFound(f"no mmproj file {model.mmproj!r} in Hugging Face repo {repo!r}; {available}")
        mmproj = found[0]
    return parts, mmproj


# ---- resolving a spec into a plan ----------------------------------------------------------


def resolve(model: ModelConfig, hub: Hub) -> Plan:
    """The files ``model`` needs, from the hub, or from the cache when the hub cannot be asked.

    Blocks (one HTTP request); run it in a thread from async code.

    Raises:
        ModelNotFound: no such repo, revision or file (or, offline, not in the cache).
        UpstreamError: the hub failed or is unreachable, and the cache does not have the model.
    """
    assert model.repo is not None
    revision = model.revision or "main"
    if hub.offline:
        plan = plan_from_cache(model, hub)
        if plan is None:
            raise ModelNotFound(
                f"model {model.name!r}: {model.repo} ({_spec_text(model)}) is not in the Hugging Face cache "
                f"at {hub.cache_dir}, and HF_HUB_OFFLINE is set"
            )
        return plan
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hub.endpoint, library_name="smart-proxy").model_info(
            model.repo, revision=model.revision, files_metadata=True, timeout=30
        )
    except Exception as exc:
        error = hub_error(exc, model.repo)
        if isinstance(error, ModelNotFound):
            raise error from exc
        plan = plan_from_cache(model, hub)
        if plan is None:
            raise error from exc
        log.warning("%s: %s; using the cached copy of %s", model.name, error.message, model.repo)
        return plan
    files = [
        RepoFile(
            name=s.rfilename,
            size=s.size,
            sha256=s.lfs.sha256 if s.lfs is not None else None,
            blob_id=s.blob_id,
        )
        for s in (info.siblings or [])
    ]
    parts, mmproj = select(files, model)
    return Plan(repo=model.repo, revision=revision, model=parts, mmproj=mmproj, commit=info.sha)


def plan_from_cache(model: ModelConfig, hub: Hub) -> Plan | None:
    """A plan from the cached snapshot of ``model``'s revision, if every file it needs is there."""
    assert model.repo is not None
    revision = model.revision or "main"
    repo_dir = hub.repo_dir(model.repo)
    commit = revision if _COMMIT.match(revision) else None
    if commit is None:
        try:
            commit = (repo_dir / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = repo_dir / "snapshots" / commit
    if not _COMMIT.match(commit) or not snapshot.is_dir():
        return None
    files = []
    for root, _dirs, names in os.walk(snapshot):
        for name in sorted(names):
            path = Path(root) / name
            if path.exists():  # a dangling link is a file that is gone
                files.append(RepoFile(name=path.relative_to(snapshot).as_posix(), size=path.stat().st_size))
    files.sort(key=lambda f: f.name)
    try:
        parts, mmproj = select(files, model)
    except ModelNotFound:
        return None
    return Plan(
        repo=model.repo,
        revision=revision,
        model=parts,
        mmproj=mmproj,
        commit=commit,
        from_cache=True,
        snapshot=str(snapshot),
    )


def _spec_text(model: ModelConfig) -> str:
    if model.file:
        return f"file {model.file}"
    return f"quant {model.quant}" if model.quant else "default quant"


# ---- downloading a plan --------------------------------------------------------------------


class DownloadCancelled(Exception):
    """Raised inside a worker thread to drop a download (the proxy is shutting down)."""


class Progress:
    """How far a download is: written by the worker thread, read by the event loop.

    Plain attributes only: ints and strings assigned under the GIL are safe to read from another
    thread, and the event loop never writes anything but :attr:`cancelled`.
    """

    def __init__(self, label: str, on_update: Callable[[Progress], object] | None = None) -> None:
        self.label = label
        #: resolving -> downloading -> verifying -> done
        self.state = "resolving"
        self.total = 0
        self.done = 0
        self.file: str | None = None
        #: Bytes on disk per file of the plan (every key is set before the first byte comes).
        self.per_file: dict[str, int] = {}
        self.cancelled = False
        self.fetched: set[str] = set()
        self._on_update = on_update
        self._started = time.monotonic()
        self._logged_at = 0.0
        self._logged_tenth = 0

    def bar_class(self, file: RepoFile) -> type:
        """A ``tqdm_class`` for hf_hub_download that counts bytes written into this Progress.

        huggingface_hub makes one per file (plain HTTP and Xet alike: having ``update_transfer``
        makes its Xet reporter use a single bar), and calls only what is defined here.
        """
        progress = self

        class Bar:
            def __init__(self, *args: object, total: int | None = None, initial: int = 0, **kwargs: object) -> None:
                self.total = total
                self.n = 0
                self.format_dict: dict[str, object] = {}
                progress.fetched.add(file.name)
                progress.file = file.name
                self.update(initial)

            def update(self, n: int | float | None = 1) -> None:
                self.n += int(n or 0)
                progress.add(int(n or 0), file.name)

            def update_transfer(self, n: int | float | None = 1) -> None:
                pass  # network bytes; progress counts bytes on disk

            def set_postfix_str(self, *args: object, **kwargs: object) -> None:
                pass

            set_transfer_postfix_str = set_description = set_postfix_str

            def refresh(self, *args: object, **kwargs: object) -> None:
                pass

            def close(self) -> None:
                pass

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

        return Bar

    def add(self, n: int, file: str | None = None) -> None:
        if self.cancelled:
            raise DownloadCancelled(f"{self.label}: download cancelled")
        self.done += n
        if file is not None:
            self.per_file[file] = self.per_file.get(file, 0) + n
        if self._on_update is not None:
            self._on_update(self)
        now = time.monotonic()
        tenth = (10 * self.done // self.total) if self.total else 0
        if tenth > self._logged_tenth or now - self._logged_at >= _LOG_EVERY:
            self._logged_tenth, self._logged_at = tenth, now
            log.info("%s: downloading %s: %s of %s", self.label, self.file, _mb(self.done), _mb(self.total))

    def elapsed(self) -> float:
        return time.monotonic() - self._started


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def fetch(plan: Plan, hub: Hub, progress: Progress | None = None) -> LocalFiles:
    """Make every file of ``plan`` local; return where they are. Blocks; run it in a thread.

    Raises:
        ModelNotFound: a file is gone from the hub (or, offline, from the cache).
        UpstreamError: the hub failed, the connection broke, or a file came down corrupt.
        InsufficientStorage: not enough free disk for what is still to download.
    """
    progress = progress or Progress(plan.repo)
    progress.total = plan.size
    progress.per_file = {f.name: f.size or 0 for f in plan.files}
    if plan.from_cache:
        assert plan.snapshot is not None
        progress.done, progress.state = plan.size, "done"
        return _local_files(plan, {f.name: os.path.join(plan.snapshot, f.name) for f in plan.files})
    missing = [f for f in plan.files if not hub.has(plan.repo, f)]
    progress.per_file.update({f.name: 0 for f in missing})
    need = sum(f.size or 0 for f in missing)
    progress.done = plan.size - need
    progress.state = "downloading"
    _check_space(hub.cache_dir, need, plan.repo)
    if missing:
        log.info(
            "%s: downloading %d file(s) of %s from Hugging Face (%s): %s",
            progress.label,
            len(missing),
            plan.repo,
            _mb(need),
            ", ".join(f.name for f in missing),
        )
    from huggingface_hub import hf_hub_download

    paths = {}
    for file in plan.files:
        done_before = progress.done
        try:
            paths[file.name] = hf_hub_download(
                plan.repo,
                file.name,
                revision=plan.revision,
                cache_dir=hub.cache_dir,
                endpoint=hub.endpoint,
                local_files_only=hub.offline,
                library_name="smart-proxy",
                tqdm_class=progress.bar_class(file),
            )
        except DownloadCancelled:
            raise
        except Exception as exc:
            raise hub_error(exc, plan.repo, file.name) from exc
        if file.name in progress.fetched:
            progress.state = "verifying"
            _verify(paths[file.name], file, plan.repo, progress)
            progress.state = "downloading"
            # the hub's size is the truth; a resumed or restarted transfer may have counted twice
            progress.done = done_before + (file.size or 0) if file.size else progress.done
        progress.per_file[file.name] = file.size or 0
    progress.done, progress.state = progress.total, "done"
    if missing:
        log.info("%s: downloaded %s in %.1fs", progress.label, _mb(need), progress.elapsed())
    return _local_files(plan, paths)


def _local_files(plan: Plan, paths: dict[str, str]) -> LocalFiles:
    return LocalFiles(
        model=paths[plan.model[0].name],
        mmproj=paths[plan.mmproj.name] if plan.mmproj is not None else None,
        parts=tuple(paths[f.name] for f in plan.files),
    )


def _check_space(cache_dir: str, need: int, repo: str) -> None:
    path = Path(cache_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if need > free:
        raise InsufficientStorage(
            f"not enough disk space to download {repo}: it needs {_mb(need)}, {cache_dir} has {_mb(free)} free"
        )


def _verify(path: str, file: RepoFile, repo: str, progress: Progress) -> None:
    """Check a file we just downloaded against the hub's hash; remove it if it does not match."""
    if file.sha256:
        digest, expected, kind = hashlib.sha256(), file.sha256, "sha256"
    elif file.blob_id and file.size is not None:
        digest, expected, kind = hashlib.sha1(f"blob {file.size}\0".encode()), file.blob_id, "git sha1"
    else:
        return
    blob = os.path.realpath(path)
    with open(blob, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            if progress.cancelled:  # a file that was not checked is not kept
                _remove(path, blob)
                raise DownloadCancelled(f"{progress.label}: download cancelled")
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected.lower():
        _remove(path, blob)
        raise UpstreamError(
            f"{file.name} from Hugging Face repo {repo!r} came down corrupt ({kind} {actual[:12]}..., expected "
            f"{expected[:12]}...); it was removed and the next request downloads it again"
        )


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def hub_error(exc: BaseException, repo: str, filename: str | None = None) -> ProxyError:
    """A huggingface_hub, network or disk error as the ProxyError a client should see."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{filename} in Hugging Face repo {repo!r}" if filename else f"Hugging Face repo {repo!r}"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, GatedRepoError):
        return ModelNotFound(f"{what} is gated: accept its terms on the hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFound(f"Hugging Face repo {repo!r} not found (if it is private or gated, set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(f"revision not found in Hugging Face repo {repo!r}: {first_line}")
    if isinstance(exc, LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else f": {first_line}"
        return UpstreamError(f"cannot download {what} and it is not in the cache{reason}")
    if isinstance(exc, EntryNotFoundError):
        return ModelNotFound(f"no file {what}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return UpstreamError(f"the Hugging Face hub answered {status} for {what}: {first_line}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"disk full while downloading {what}: {exc}")
    return UpstreamError(f"downloading {what} failed: {type(exc).__name__}: {first_line}")


# ---- the async side ------------------------------------------------------------------------


@attrs.frozen
class DownloadSnapshot:
    model: str
    repo: str
    files: tuple[str, ...]
    #: resolving, downloading or verifying
    state: str
    bytes_done: int
    bytes_total: int
    #: Requests waiting for it.
    waiting: int
    #: Seconds since the download started.
    elapsed: float


@attrs.frozen
class DownloadFailure:
    """The last download of a model spec that failed, kept for display until the next one starts."""

    message: str
    #: When it failed, in seconds since the epoch.
    at: float


def _key(model: ModelConfig) -> tuple[str | None, ...]:
    assert model.repo is not None
    return (model.repo.lower(), model.revision or "main", model.file, model.quant and model.quant.upper(), model.mmproj)


@attrs.frozen
class FileStatus:
    """One file of a download: its name, content hash, size and bytes on disk so far."""

    name: str
    #: The hub's sha256 of the content; None for a small non-LFS file, or a plan made from the cache.
    sha256: str | None
    total: int
    completed: int


@attrs.frozen
class DownloadStatus:
    """Where one download is, file by file, for a client that watches it."""

    #: resolving, downloading, verifying, done, or failed
    state: str
    #: The plan's files in download order; empty while resolving.
    files: tuple[FileStatus, ...]


class Download:
    """The download of one model spec, in the Downloads service's nursery: wait on it, or watch it."""

    def __init__(self, key: tuple[str | None, ...], model: ModelConfig) -> None:
        self.key = key
        self.model = model
        self.progress = Progress(model.name)
        self.plan: Plan | None = None
        #: Requests waiting for it (shown in /health).
        self.waiters = 0
        self.done = trio.Event()
        self.files: LocalFiles | None = None
        self.error: ProxyError | None = None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the caller among the requests waiting for this download while the block runs."""
        self.waiters += 1
        try:
            yield
        finally:
            self.waiters -= 1
            if self.waiters == 0 and not self.done.is_set():
                log.info("%s: every request waiting for the download has gone; it carries on for the next", self.model.name)

    async def wait(self) -> LocalFiles:
        """The files, once downloaded.

        Raises:
            ModelNotFound, UpstreamError, InsufficientStorage: see the module docstring.
        """
        with self.waiting():
            await self.done.wait()
        if self.error is not None:
            raise copy.copy(self.error)
        assert self.files is not None
        return self.files

    def status(self) -> DownloadStatus:
        progress = self.progress
        state = "failed" if self.error is not None else ("done" if self.done.is_set() else progress.state)
        per_file = dict(progress.per_file)  # the worker thread writes it; copying a dict holds the GIL
        files = tuple(
            FileStatus(f.name, f.sha256, f.size or 0, min(per_file.get(f.name, 0), f.size or 0))
            for f in (self.plan.files if self.plan is not None else ())
        )
        return DownloadStatus(state, files)


def _call(done: Callable[[], object], fn: Callable[..., object], *args: object) -> object:
    try:
        return fn(*args)
    finally:
        done()


async def _in_thread(progress: Progress, fn: Callable[..., object], *args: object) -> object:
    """Run ``fn`` in a worker thread; if cancelled, ask it to stop and give it a moment to clean up.

    The thread is abandoned on cancellation (it cannot be interrupted), told to stop through
    ``progress.cancelled``, and waited for a little, shielded, so that huggingface_hub can remove
    its temporary file before the proxy exits.
    """
    stopped = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def done() -> None:  # runs in the worker thread
        try:
            token.run_sync_soon(stopped.set)
        except trio.RunFinishedError:
            pass

    try:
        return await trio.to_thread.run_sync(_call, done, fn, *args, abandon_on_cancel=True)
    except trio.Cancelled:
        progress.cancelled = True
        with trio.CancelScope(shield=True), trio.move_on_after(_STOP_GRACE):
            await stopped.wait()
        raise


class Downloads:
    """Every model download in flight, one per model spec; a service for the root nursery.

    With a ``bus``, each download is published as ``download`` events (docs/events.md): its
    start, its progress every ``_REPORT_EVERY`` seconds while it changes, and its end (``done``
    or ``failed`` with the error), in that order.
    """

    def __init__(self, hub: Hub | None = None, *, bus: EventBus | None = None) -> None:
        self.hub = hub or Hub.from_env()
        self._bus = bus
        self._jobs: dict[tuple[str | None, ...], Download] = {}
        #: Finished downloads, by spec: their files are in the cache.
        self._ready: dict[tuple[str | None, ...], Download] = {}
        #: The last failure of each spec whose latest download failed (shown, never retried from).
        self._failed: dict[tuple[str | None, ...], DownloadFailure] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[Downloads] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the download jobs until cancelled; cancelling drops the downloads in flight."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def local(self, model: ModelConfig) -> LocalFiles | None:
        """The files of ``model`` if this process has already fetched them and they are still there."""
        download = self._finished(_key(model))
        return download.files if download is not None else None

    def _finished(self, key: tuple[str | None, ...]) -> Download | None:
        download = self._ready.get(key)
        return download if download is not None and download.files is not None and download.files.exist() else None

    def start(self, model: ModelConfig) -> Download:
        """The download of repo model ``model``: the one in flight, a finished one whose files are
        still there, or a new one started now. Never waits."""
        key = _key(model)
        download = self._jobs.get(key) or self._finished(key)
        if download is not None:
            return download
        if self._nursery is None:
            raise RuntimeError("Downloads.run() is not running")
        download = Download(key, model)
        self._jobs[key] = download
        self._failed.pop(key, None)
        self._nursery.start_soon(self._run, download)
        return download

    async def fetch(self, model: ModelConfig) -> LocalFiles:
        """The local files of repo model ``model``, downloading what is missing (once, however many ask).

        Raises:
            ModelNotFound, UpstreamError, InsufficientStorage: see the module docstring.
        """
        files = self.local(model)
        if files is not None:
            return files
        return await self.start(model).wait()

    def _publish(self, job: Download, state: str, error: str | None = None) -> None:
        if self._bus is None:
            return
        done, total = job.progress.done, job.progress.total
        self._bus.publish(
            "download",
            model=job.model.name,
            repo=job.model.repo,
            state=state,
            bytes_done=done,
            bytes_total=total,
            percent=round(100 * done / total, 1) if total else None,
            **({"error": error} if error is not None else {}),
        )

    async def _report(self, job: Download) -> None:
        """Publish ``job``'s progress while it runs, when it changed since the last report."""
        last = None
        while not job.done.is_set():
            now = (job.progress.state, job.progress.done, job.progress.total)
            if now != last and now[0] != "done":  # the end is published by _run, once
                last = now
                self._publish(job, job.progress.state)
            with trio.move_on_after(_REPORT_EVERY):
                await job.done.wait()

    async def _run(self, job: Download) -> None:
        try:
            if self._bus is not None and self._nursery is not None:
                self._nursery.start_soon(self._report, job)
            job.plan = await _in_thread(job.progress, resolve, job.model, self.hub)
            job.files = await _in_thread(job.progress, fetch, job.plan, self.hub, job.progress)
            self._ready[job.key] = job
        except ProxyError as exc:
            job.error = exc
            log.error("%s: %s", job.model.name, exc.message)
        except trio.Cancelled:
            job.error = UpstreamError(f"model {job.model.name!r}: download interrupted: the proxy is shutting down")
            raise
        except Exception as exc:
            job.error = UpstreamError(f"model {job.model.name!r}: download failed: {type(exc).__name__}: {exc}")
            log.exception("%s: download failed", job.model.name)
        finally:
            del self._jobs[job.key]
            if job.error is not None:
                self._failed[job.key] = DownloadFailure(job.error.message, time.time())
            job.done.set()
            self._publish(job, "failed" if job.error is not None else "done", job.error.message if job.error else None)

    def snapshot(self) -> tuple[DownloadSnapshot, ...]:
        """The downloads in flight, for /health."""
        return tuple(_snapshot(job) for job in self._jobs.values())

    def in_flight(self, model: ModelConfig) -> DownloadSnapshot | None:
        """The download of repo model ``model``'s spec in flight now, if there is one."""
        job = self._jobs.get(_key(model))
        return _snapshot(job) if job is not None else None

    def last_failure(self, model: ModelConfig) -> DownloadFailure | None:
        """Why the latest download of ``model``'s spec failed, if it did (None once another starts)."""
        return self._failed.get(_key(model))


def _snapshot(job: Download) -> DownloadSnapshot:
    return DownloadSnapshot(
        model=job.model.name,
        repo=job.model.repo or "",
        files=tuple(f.name for f in job.plan.files) if job.plan else (),
        state=job.progress.state,
        bytes_done=job.progress.done,
        bytes_total=job.progress.total,
        waiting=job.waiters,
        elapsed=round(job.progress.elapsed(), 3),
    )
