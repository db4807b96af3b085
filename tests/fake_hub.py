"""A Hugging Face hub stand-in on 127.0.0.1, for the real huggingface_hub client (``HF_ENDPOINT``).

It answers the routes huggingface_hub 2.x calls for ``model_info``, ``list_repo_files`` and
``hf_hub_download``, with the headers it reads:

    GET  /api/models/ORG/NAME[/revision/REV][?blobs=true]   model_info: sha, siblings (size, blobId, lfs)
    GET  /api/models/ORG/NAME/tree/REV[?recursive=true]     list_repo_tree / list_repo_files
    HEAD /ORG/NAME/resolve/REV/PATH                         X-Repo-Commit, ETag, X-Linked-Etag/-Size;
                                                            LFS files: 302 + Location on the "CDN"
    GET  /ORG/NAME/resolve/REV/PATH                         small (non-LFS) files' content
    GET  /cdn/SHA256  (on a second port: another origin, as the real CDN is)   LFS content, Range

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) as the real hub's do,
so huggingface_hub raises its own exceptions. :class:`Faults` makes it fail on purpose: a status
for the API or a file, a connection dropped mid-file, corrupt bytes, a slow transfer, a lie about
a size. Every request is recorded in :attr:`FakeHub.requests`.

Content is served from bytes or streamed from a file on disk (the 250 MB gemma is never copied).
Standard library only; it runs in daemon threads of the test process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_CHUNK = 256 * 1024


@dataclass
class HubFile:
    name: str
    source: bytes | Path
    #: Stored with Git LFS (served through the CDN redirect, hashed with sha256).
    lfs: bool = True
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256 and self.lfs:
            self.sha256 = sha256_of(self.source)

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    @property
    def git_oid(self) -> str:
        """The git blob id: sha1 of the pointer file for LFS files, of the content otherwise."""
        if self.lfs:
            content = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
            )
        else:
            content = self.source if isinstance(self.source, bytes) else self.source.read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with open(self.source, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)


def sha256_of(source: bytes | Path) -> str:
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Repo:
    id: str
    files: dict[str, HubFile]
    commit: str = field(default_factory=lambda: secrets.token_hex(20))
    #: A bearer token the repo requires (a private repo); None = public.
    token: str | None = None

    @property
    def revisions(self) -> dict[str, str]:
        return {"main": self.commit, self.commit: self.commit}


@dataclass
class Faults:
    """Ways to make the hub misbehave; tests set and clear these while it runs."""

    #: Status for every /api/models request (e.g. 500).
    api_status: int | None = None
    #: File name -> status for its content (the CDN GET, or the resolve GET of a small file).
    file_status: dict[str, int] = field(default_factory=dict)
    #: File name -> (byte offset, times): close the connection once the body reaches the offset.
    drop_at: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Files whose content comes down with one byte flipped, halfway through (same size).
    corrupt: set[str] = field(default_factory=set)
    #: File name -> seconds per MiB sent.
    slow: dict[str, float] = field(default_factory=dict)
    #: File name -> size the hub claims (model_info and HEAD), whatever the content.
    claimed_size: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    range: str | None
    #: Body bytes sent so far.
    sent: int = 0
    #: The client hung up before the answer was complete.
    aborted: bool = False


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.requests: list[Request] = []
        self._servers: list[ThreadingHTTPServer] = []
        self.url = ""
        self.cdn_url = ""

    # ---- setting up ----------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: list[HubFile], token: str | None = None) -> Repo:
        repo = Repo(repo_id, {f.name: f for f in files}, token=token)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> FakeHub:
        hub = self._serve(self._handler(cdn=False))
        cdn = self._serve(self._handler(cdn=True))
        self.url = f"http://127.0.0.1:{hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._servers.append(server)
        return server

    # ---- looking in ----------------------------------------------------------------------

    def count(self, method: str, pattern: str) -> int:
        """Requests with this method whose path matches the regex ``pattern``."""
        return sum(1 for r in self.requests if r.method == method and re.search(pattern, r.path))

    def content_gets(self, name: str) -> int:
        """GETs of a file's content (CDN or resolve), whoever asked."""
        repo_file = self._find_file(name)
        cdn = self.count("GET", rf"^/cdn/{repo_file.sha256}$") if repo_file.lfs else 0
        return cdn + self.count("GET", rf"/resolve/[^/]+/{re.escape(name)}$") * (not repo_file.lfs)

    def _find_file(self, name: str) -> HubFile:
        for repo in self.repos.values():
            if name in repo.files:
                return repo.files[name]
        raise KeyError(name)

    def _size(self, f: HubFile) -> int:
        return self.faults.claimed_size.get(f.name, f.size)

    # ---- answering -----------------------------------------------------------------------

    def _handler(self, cdn: bool) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self._dispatch(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._dispatch(head=False)

            def _dispatch(self, head: bool) -> None:
                url = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(url.path)
                query = urllib.parse.parse_qs(url.query)
                self.record = Request(self.command, path, self.headers.get("Authorization"), self.headers.get("Range"))
                hub.requests.append(self.record)
                try:
                    if cdn:
                        self._cdn(path, head)
                    elif path.startswith("/api/models/"):
                        self._api(path.removeprefix("/api/models/"), query)
                    elif "/resolve/" in path:
                        self._resolve(path.lstrip("/"), head)
                    else:
                        self._error(404, "NotFound", "no such route")
                except (BrokenPipeError, ConnectionResetError):
                    self.record.aborted = True

            # -- helpers --

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **(headers or {})}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body and not head:
                    self.wfile.write(body)

            def _json(self, body: object, headers: dict[str, str] | None = None) -> None:
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
                body = json.dumps({"error": message}).encode()
                self._send(
                    status,
                    body,
                    {
                        "Content-Type": "application/json",
                        "X-Error-Code": code,
                        "X-Error-Message": message,
                        **(headers or {}),
                    },
                )

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(401, "RepoNotFound", "Invalid username or password.")
                    return None
                return repo

            # -- /api/models --

            def _api(self, rest: str, query: dict[str, list[str]]) -> None:
                if hub.faults.api_status is not None:
                    self._error(hub.faults.api_status, "ServerError", "the fake hub is failing on purpose")
                    return
                match = re.match(r"^([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?/?$", rest)
                if match is None:
                    self._error(404, "NotFound", "no such route")
                    return
                repo = self._repo(match.group(1))
                if repo is None:
                    return
                revision = match.group(3) or "main"
                commit = repo.revisions.get(revision)
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                if match.group(2) == "tree":
                    self._json([self._tree_entry(f) for f in repo.files.values()])
                    return
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                siblings = [self._sibling(f) if blobs else {"rfilename": f.name} for f in repo.files.values()]
                self._json(
                    {
                        "_id": repo.id,
                        "id": repo.id,
                        "modelId": repo.id,
                        "sha": commit,
                        "private": repo.token is not None,
                        "siblings": siblings,
                        "tags": ["gguf"],
                    }
                )

            def _sibling(self, f: HubFile) -> dict:
                entry = {"rfilename": f.name, "size": hub._size(f), "blobId": f.git_oid}
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": hub._size(f), "pointerSize": 134}
                return entry

            def _tree_entry(self, f: HubFile) -> dict:
                entry = {"type": "file", "oid": f.git_oid, "size": hub._size(f), "path": f.name}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": hub._size(f), "pointerSize": 134}
                return entry

            # -- /ORG/NAME/resolve/REV/PATH --

            def _resolve(self, rest: str, head: bool) -> None:
                match = re.match(r"^([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", rest)
                if match is None:
                    self._error(404, "NotFound", "no such route")
                    return
                repo = self._repo(match.group(1))
                if repo is None:
                    return
                commit = repo.revisions.get(match.group(2))
                if commit is None:
                    self._error(404, "RevisionNotFound", "Invalid rev id")
                    return
                f = repo.files.get(match.group(3))
                if f is None:
                    self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
                    return
                common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
                if f.lfs:
                    # the real hub redirects LFS content to its CDN, another host
                    self._send(
                        302,
                        b"",
                        {
                            **common,
                            "Location": f"{hub.cdn_url}/cdn/{f.sha256}?name={urllib.parse.quote(f.name)}",
                            "ETag": f'"{f.git_oid}"',
                            "X-Linked-Etag": f'"{f.sha256}"',
                            "X-Linked-Size": str(hub._size(f)),
                        },
                        head=head,
                    )
                    return
                self._content(f, head, {**common, "ETag": f'"{f.git_oid}"'})

            # -- the CDN --

            def _cdn(self, path: str, head: bool) -> None:
                sha = path.removeprefix("/cdn/")
                for repo in hub.repos.values():
                    for f in repo.files.values():
                        if f.lfs and f.sha256 == sha:
                            self._content(f, head, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})
                            return
                self._send(404, b"NoSuchKey")

            def _content(self, f: HubFile, head: bool, headers: dict[str, str]) -> None:
                faults = hub.faults
                if not head and f.name in faults.file_status:
                    self._error(faults.file_status[f.name], "ServerError", "the fake hub is failing on purpose")
                    return
                size = f.size
                start, end, status = 0, size, 200
                ranged = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
                if ranged and not head:
                    start = int(ranged.group(1))
                    end = min(size, int(ranged.group(2)) + 1) if ranged.group(2) else size
                    if start >= size:
                        self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                        return
                    status = 206
                    headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}
                self.send_response(status)
                for key, value in {
                    **headers,
                    "Content-Length": str(end - start),
                    "Content-Type": "application/octet-stream",
                }.items():
                    self.send_header(key, value)
                self.end_headers()
                if head:
                    return
                drop = faults.drop_at.get(f.name)
                stop_at = end
                if drop is not None and drop[1] > 0:
                    faults.drop_at[f.name] = (drop[0], drop[1] - 1)
                    stop_at = max(start, min(end, drop[0]))
                position = start
                while position < stop_at:
                    chunk = f.read(position, min(stop_at, position + _CHUNK))
                    middle = size // 2 - position
                    if f.name in faults.corrupt and 0 <= middle < len(chunk):
                        chunk = chunk[:middle] + bytes([chunk[middle] ^ 0x01]) + chunk[middle + 1 :]
                    self.wfile.write(chunk)
                    position += len(chunk)
                    self.record.sent += len(chunk)
                    if f.name in faults.slow:
                        self.wfile.flush()
                        time.sleep(faults.slow[f.name] * len(chunk) / (1024 * 1024))
                if stop_at < end:  # drop the connection mid-file
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        return Handler


def split_bytes(data: bytes, parts: int) -> list[bytes]:
    step = -(-len(data) // parts)
    return [data[i * step : (i + 1) * step] for i in range(parts)]


def environ_for(hub: FakeHub, hf_home: Path) -> dict[str, str]:
    """Environment for a subprocess that should use ``hub`` and ``hf_home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"})
    return env
