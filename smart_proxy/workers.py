"""Several router processes on one port: ``[proxy] workers = N`` (or ``--workers N``).

A proxy whose catalog has no models of its own (a router: only ``[peer:NAME]`` sections)
keeps no state a request needs, so it can run as N processes that share its port, one per
core. This parent runs no proxy itself: it starts N workers (each the same ``smart-proxy``
command line, told by :data:`WORKER_ENV` that it is worker *i*), keeps them running, and
stops them together.

* Each worker binds the port with ``SO_REUSEPORT`` (:func:`smart_proxy.server.serve`), so
  the kernel spreads new connections over their listening sockets.
* Each runs under :mod:`smart_proxy.lifeline`, so a worker dies with this parent however
  it died (SIGKILL included), and this parent's SIGTERM reaches it through the lifeline.
* SIGINT or SIGTERM to the parent: every worker gets SIGTERM and drains as a single proxy
  does (``[proxy] grace``); after the grace and a few seconds more, SIGKILL.
* A worker that exits on its own is started again, after a pause that doubles (up to
  :data:`MAX_PAUSE`) while it keeps dying within :data:`HEALTHY_AFTER` of its start.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

log = logging.getLogger(__name__)

#: Set in a worker's environment to its number (1..N): it serves, it does not start workers.
WORKER_ENV = "SMART_PROXY_WORKER"
#: A worker that ran this long before it exited is restarted after the first pause again.
HEALTHY_AFTER = 10.0
FIRST_PAUSE = 0.5
MAX_PAUSE = 30.0
#: Past the drain's grace, how long a worker has to exit before SIGKILL.
KILL_AFTER = 5.0

_LIFELINE = str(Path(__file__).with_name("lifeline.py"))


def is_worker() -> bool:
    """True in a process started by :func:`supervise`."""
    return bool(os.environ.get(WORKER_ENV))


def worker_command(argv: list[str]) -> list[str]:
    """The command line of one worker: this Python, the package, the parent's arguments, under a lifeline."""
    return [sys.executable, "-S", _LIFELINE, "--", sys.executable, "-m", "smart_proxy", *argv]


async def supervise(argv: list[str], count: int, grace: float) -> None:
    """Run ``count`` workers with the CLI arguments ``argv`` until SIGINT or SIGTERM; then stop them all."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            for number in range(1, count + 1):
                nursery.start_soon(_keep_running, argv, number, grace)
            log.info("started %d workers on one port; SIGTERM or Ctrl-C stops them", count)
            async for signum in signals:
                log.info("received %s: stopping %d workers (each drains for up to %gs)",
                         signal.Signals(signum).name, count, grace)
                break
        nursery.cancel_scope.cancel()


async def _keep_running(argv: list[str], number: int, grace: float) -> None:
    pause = FIRST_PAUSE
    env = {**os.environ, WORKER_ENV: str(number)}

    async def stop(process: trio.Process) -> None:
        process.send_signal(signal.SIGTERM)  # the lifeline forwards it: the worker drains
        with trio.move_on_after(grace + KILL_AFTER):
            await process.wait()
            return
        log.warning("worker %d did not stop in %gs: killing it", number, grace + KILL_AFTER)
        process.kill()

    # stdin: the lifeline's pipe, never written, closed when this process dies. stdout is
    # dropped: the lifeline's first line (the worker's pid) is not for the user, and a worker
    # logs to stderr, which it shares with this process.
    run = partial(trio.run_process, worker_command(argv), env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                  check=False, deliver_cancel=stop, start_new_session=True)
    while True:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(run)
            log.info("worker %d started", number)
        code = process.returncode
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        pause = FIRST_PAUSE if trio.current_time() - started >= HEALTHY_AFTER else min(pause * 2, MAX_PAUSE)
        log.warning("worker %d stopped (%s); starting it again in %gs", number, why, pause)
        await trio.sleep(pause)
