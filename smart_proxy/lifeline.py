"""A lifeline between the proxy and one llama-server, run as ``python -S lifeline.py CMD ARGS...``.

Or as ``python -S lifeline.py`` with no command: a spare, started ahead of a load, that
reads its command line from stdin (see below) and then goes on exactly as if it had been
given it as arguments.

Why it exists: the kernel's parent-death signal (``PR_SET_PDEATHSIG``) fires when the
*thread* that forked the child exits, and ``trio.run_process`` forks from a worker thread
that retires after a few idle seconds. A llama-server tied to that thread would be killed
for no reason; one tied to nothing outlives a proxy killed by SIGKILL.

So the proxy starts this small program instead, with a pipe on its stdin that the proxy
never writes. It forks llama-server from its own main thread, with the parent-death signal
set (this program dies, llama-server dies), and then:

* prints ``lifeline: pid N`` so the proxy knows llama-server's own pid;
* forwards SIGTERM and SIGINT to llama-server (the proxy's graceful stop);
* kills llama-server when its stdin reaches EOF: the proxy is gone, however it died;
* exits the way llama-server exited (same code, or the same signal).

The command may begin with ``--env NAME=VALUE`` pairs: those variables are set in
llama-server's environment on top of the one inherited (a GPU placement's
``CUDA_VISIBLE_DEVICES``), as ``env NAME=VALUE CMD`` would, without a process more.

A spare reads one message from stdin: the length in bytes of what follows, in decimal, and
a newline; then every argument followed by a NUL byte (an argument may hold a newline, never
a NUL). It reads no further: stdin stays the pipe it watches for EOF. EOF before the whole
message means the proxy gave up on it: it exits 0 and starts nothing. Everything it can do
before it knows the command (its imports, loading libc) it does while it waits, so a load
that takes a spare pays one read and the fork.

It is a separate, synchronous program (standard library only, started with ``-S``): no
Trio, no package imports, so it starts quickly. Its start-up lies on the path of every
model load (a swap waits on it), so it takes the C modules ``_signal`` and ``_thread``
rather than ``signal`` and ``threading``, whose enum and class machinery would add to
every start.
"""

from __future__ import annotations

import _signal as signal
import _thread
import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1


def _split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``--env NAME=VALUE`` pairs of a command, and the command after them."""
    env: dict[str, str] = {}
    while len(argv) >= 2 and argv[0] == "--env" and "=" in argv[1]:
        name, _, value = argv[1].partition("=")
        env[name] = value
        argv = argv[2:]
    return env, argv


def _child(argv: list[str], parent: int, libc: ctypes.CDLL | None, env: dict[str, str]) -> None:
    """In the forked child: die with this lifeline, stdin from /dev/null, its variables set, exec llama-server."""
    try:
        os.environ.update(env)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"lifeline: cannot run {argv[0]}: {exc}\n".encode())
    os._exit(127)


def _read_exactly(size: int) -> bytes | None:
    """``size`` bytes of stdin, or None at EOF before them."""
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_command() -> list[str] | None:
    """A spare's command line from stdin (see the module docstring); None at EOF."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)  # one at a time: nothing past the header may be taken from the pipe
        if not byte:
            return None
        header += byte
    payload = _read_exactly(int(header))
    if payload is None:
        return None
    return [os.fsdecode(arg) for arg in payload.split(b"\0")[:-1]]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None
    if not argv:  # a spare: wait for the command
        command = _read_command()
        if command is None:
            return 0
        argv = command
    env, argv = _split_env(argv)
    if not argv:
        print("usage: lifeline.py COMMAND [ARGS...], or the command on stdin", file=sys.stderr)
        return 2
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(argv, parent, libc, env)
    # one write, so the line reaches the pipe whole whatever the command writes at once (an unbuffered
    # print writes the text and its newline apart, and the two outputs could interleave between them)
    os.write(sys.stdout.fileno(), f"lifeline: pid {pid}\n".encode())

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def watch_stdin() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        try:  # EOF: the proxy is gone
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    _thread.start_new_thread(watch_stdin, ())  # dies with the process, like a daemon thread
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # died by a signal: die by the same one, so the proxy sees what happened
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
