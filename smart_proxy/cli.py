"""The ``smart-proxy`` command: ``smart-proxy [--config proxy.ini] [--host H] [--port P] [--log-format json]``."""

from __future__ import annotations

import argparse
import sys

import trio

from .config import load_config
from .errors import ConfigError
from .logs import setup_logging
from .server import serve

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smart-proxy", description="A Trio smart proxy for local LLMs.")
    parser.add_argument("--config", default="proxy.ini", help="path to proxy.ini (default: ./proxy.ini)")
    parser.add_argument("--host", help="address to listen on (default: [proxy] host)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default: [proxy] port)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="debug adds every llama-server output line, as [MODEL] line (default: info)",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one JSON object a line (default: text)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
        trio.run(lambda: serve(config, host=args.host, port=args.port))
    except ConfigError as exc:
        print(f"smart-proxy: {exc}", file=sys.stderr)
        return 2
    return 0
