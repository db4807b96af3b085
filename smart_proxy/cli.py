"""The ``smart-proxy`` command.

    smart-proxy [--config proxy.ini] [--host H] [--port P] [--log-format json]   serve (or: smart-proxy serve)
    smart-proxy pull NAME [--config proxy.ini]               download a model ahead of time
    smart-proxy models [--config proxy.ini] [--json]         list the catalog: source, size, memory, local?
    smart-proxy doctor [--config proxy.ini] [--model NAME]   can this machine serve? (exit 0: yes)
    smart-proxy ps [--url URL] [--api-key KEY] [--json]      a running proxy's llama-servers
    smart-proxy stop MODEL [--url URL] [--api-key KEY]       unload a model of a running proxy
    smart-proxy logs MODEL [-f] [--url URL] [--api-key KEY]  a model's llama-server output (-f: follow)
    smart-proxy demo [--port P] [--keep]                     see it work: requests of every dialect, a table (exit 0: all passed)

Options may come before or after the subcommand. A config error is one line and exit status 2;
a failed pull is one line and exit status 1. Serving: the first SIGINT or SIGTERM drains and
exits 0; a second SIGINT stops at once and exits 130 (see :mod:`smart_proxy.server`).
``ps``, ``stop`` and ``logs`` talk to a running proxy through its API (:mod:`smart_proxy.control`);
when it does not answer, one line and exit status 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import trio

from . import control, demo, doctor
from .catalog import Catalog, describe
from .config import Config, check_workers, load_config
from .download import Hub, Progress, fetch, resolve
from .errors import ConfigError, ProxyError
from .logs import setup_logging
from .memory import format_size
from .server import serve
from .workers import is_worker, supervise

__all__ = ["main"]

_LEVELS = ["debug", "info", "warning", "error"]
#: Exit status after Ctrl-C (a second SIGINT while draining): 128 + SIGINT, as a shell reports a
#: program that SIGINT ended, so scripts and supervisors see "interrupted", not success or a crash.
INTERRUPTED = 130
#: The cyclic collector's young-generation threshold while serving (Python's default is 700).
#: Most of a request's objects die by reference count; what the collector counts is the net
#: growth, so at 700 young collections run every few dozen requests, and each walks every
#: object the requests in flight hold, then again in the middle generation they are promoted
#: to: a cost per request that grows with the number of clients. A threshold this size runs
#: them thousands of requests apart, for a little more memory (docs/bench/findings.md).
GC_YOUNG_THRESHOLD = 20_000


def build_parser() -> argparse.ArgumentParser:
    def common(parser: argparse.ArgumentParser, top: bool) -> None:
        # on subcommands the defaults are SUPPRESSed, so an option given before the subcommand stands
        default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
        parser.add_argument("--config", default=default("proxy.ini"), help="path to proxy.ini (default: ./proxy.ini)")
        parser.add_argument(
            "--log-level",
            default=default(None),
            choices=_LEVELS,
            help="debug adds every llama-server output line, as [MODEL] line (default: info to serve, else warning)",
        )
        parser.add_argument(
            "--log-format",
            default=default("text"),
            choices=["text", "json"],
            help="json: one JSON object a line (default: text)",
        )

    def listen(parser: argparse.ArgumentParser, top: bool) -> None:
        default = None if top else argparse.SUPPRESS
        parser.add_argument("--host", default=default, help="address to listen on (default: [proxy] host)")
        parser.add_argument(
            "--port", type=int, default=default, help="port to listen on; 0 picks a free one (default: [proxy] port)"
        )
        parser.add_argument(
            "--workers", type=int, default=default,
            help="processes sharing the port, for a router with peers only (default: [proxy] workers, 1)",
        )

    parser = argparse.ArgumentParser(prog="smart-proxy", description="A Trio smart proxy for local LLMs.")
    common(parser, top=True)
    listen(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="{serve,pull,models,doctor,ps,stop,logs,demo}")
    serve_parser = commands.add_parser("serve", help="run the proxy (the default)")
    common(serve_parser, top=False)
    listen(serve_parser, top=False)
    pull_parser = commands.add_parser("pull", help="download a catalog model's files ahead of time")
    pull_parser.add_argument("name", help="a [model:NAME] of proxy.ini (or hf.co/ORG/REPO:QUANT if allowed)")
    common(pull_parser, top=False)
    models_parser = commands.add_parser("models", help="list the catalog: source, size, memory, and whether it is local")
    models_parser.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    common(models_parser, top=False)
    doctor_parser = commands.add_parser(
        "doctor", help="check that this machine can serve: llama-server, CPU, a one-token answer, memory, disk"
    )
    doctor_parser.add_argument("--model", help="the catalog model to answer one token (default: the embedded one)")
    common(doctor_parser, top=False)
    add_control_commands(commands)
    demo_parser = commands.add_parser(
        "demo", help="start a proxy on the embedded model, send it requests of every dialect, print what happened"
    )
    demo_parser.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port to listen on (default: a free one)")
    demo_parser.add_argument("--keep", action="store_true", help="keep the proxy serving after the table, until Ctrl-C")
    common(demo_parser, top=False)
    return parser


def add_control_commands(commands: argparse._SubParsersAction) -> None:
    """``ps``, ``stop`` and ``logs``: clients of a running proxy (see :mod:`smart_proxy.control`)."""

    def remote(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=control.DEFAULT_URL, help=f"the running proxy (default: {control.DEFAULT_URL})")
        parser.add_argument(
            "--api-key",
            default=os.environ.get("SMART_PROXY_API_KEY"),
            help="its API key, when it has keys (default: $SMART_PROXY_API_KEY)",
        )

    ps_parser = commands.add_parser("ps", help="a running proxy's llama-servers: state, memory, slots, expiry")
    ps_parser.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    remote(ps_parser)
    stop_parser = commands.add_parser("stop", help="unload a model of a running proxy (a pinned one stays)")
    stop_parser.add_argument("model", help="the model to unload")
    remote(stop_parser)
    logs_parser = commands.add_parser("logs", help="the last lines a model's llama-server printed")
    logs_parser.add_argument("model", help="the model whose llama-server output to show")
    logs_parser.add_argument("-f", "--follow", action="store_true", help="then print new lines as they come, until Ctrl-C")
    remote(logs_parser)


def run_control(args: argparse.Namespace) -> int:
    """Run ``ps``, ``stop`` or ``logs`` against the proxy at ``--url``."""
    try:
        if args.command == "ps":
            return control.ps(args.url, args.api_key, as_json=args.json)
        if args.command == "stop":
            return control.stop(args.url, args.api_key, args.model)
        return control.logs(args.url, args.api_key, args.model, follow=args.follow)
    except control.ControlError as exc:
        print(f"smart-proxy {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    level = args.log_level or ("info" if command == "serve" else "warning")
    setup_logging(level, args.log_format)
    if command == "doctor":
        return doctor.run(args.config, args.model)
    if command in ("ps", "stop", "logs"):
        return run_control(args)
    if command == "demo":
        try:
            return demo.run(port=args.port or 0, keep=args.keep)
        except KeyboardInterrupt:
            return INTERRUPTED
    try:
        config = load_config(args.config)
        if command == "pull":
            return pull(config, args.name)
        if command == "models":
            return models(config, as_json=args.json)
        workers = config.proxy.workers if args.workers is None else args.workers
        check_workers(config, workers)
        if workers > 1 and not is_worker():
            if (config.proxy.port if args.port is None else args.port) == 0:
                raise ConfigError("--workers: the workers share one port; give one (--port N), not 0")
            trio.run(supervise, sys.argv[1:] if argv is None else argv, workers, config.proxy.grace)
            return 0
        tune_gc()
        trio.run(lambda: serve(config, host=args.host, port=args.port, reuse_port=workers > 1))
    except ConfigError as exc:
        print(f"smart-proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return INTERRUPTED
    except BaseExceptionGroup as group:
        # Trio wraps a KeyboardInterrupt that surfaces inside a nursery (a Ctrl-C after the
        # signal receiver let go): still the user's interrupt, not a crash to print
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
        return INTERRUPTED
    return 0


def tune_gc() -> None:
    """Set the collector up for serving: a larger young generation, start-up objects frozen.

    Everything alive now (modules, the config, the catalog) lives as long as the process, so
    it goes to the permanent generation, which full collections do not walk.
    """
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    gc.collect()
    gc.freeze()


# ---- pull --------------------------------------------------------------------------------


def pull(config: Config, name: str) -> int:
    """Download ``name``'s files into the HF cache with a progress bar; print the GGUF's path."""
    catalog = Catalog(config.models, config.base_dir, config.catalog)
    try:
        model = catalog.get(name)
        if model.repo is None:
            print(trio.run(catalog.gguf_path, model))  # a local file: nothing to download
            return 0
        hub = Hub.from_env()
        plan = resolve(model, hub)
        with _bar(f"pulling {model.name}", plan.size) as bar:
            progress = Progress(model.name, on_update=lambda p: bar.update(p.done - bar.n))
            files = fetch(plan, hub, progress)
            bar.update(progress.done - bar.n)
    except ProxyError as exc:
        print(f"smart-proxy: pull {name}: {exc.message}", file=sys.stderr)
        return 1
    print(files.model)
    return 0


def _bar(description: str, total: int):
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


# ---- models ------------------------------------------------------------------------------


def models(config: Config, *, as_json: bool = False) -> int:
    """Print every catalog model: where it comes from, its size, whether it is on disk, and the memory one server holds."""
    hub = Hub.from_env()
    rows = [describe(model, config.base_dir, hub) for model in config.models.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "SOURCE", "SIZE", "MEMORY", "LOCAL")]
    for row in rows:
        local = "-" if row["local"] is None else ("yes" if row["local"] else "no")
        memory = format_size(row["memory"]) if isinstance(row["memory"], int) else "?"
        table.append((row["name"], row["source"], _size(row["size"]), memory, local))
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    for line, row in zip(table, [None, *rows], strict=True):
        text = "  ".join(cell.ljust(width) for cell, width in zip(line[:4], widths, strict=True)) + "  " + line[4]
        if row is not None and row.get("error"):
            text += f"   ({row['error']})"
        print(text)
    return 0


def _size(size: object) -> str:
    if not isinstance(size, int):
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")
