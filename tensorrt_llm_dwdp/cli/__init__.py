"""Command-line entry: ``python -m tensorrt_llm_dwdp <command>``.

Each command lives in its own module under ``tensorrt_llm_dwdp/cli/commands/`` and exposes
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``main(args) -> int``. Commands are found by
listing that package, so adding one never touches this file.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from tensorrt_llm_dwdp import __version__
from tensorrt_llm_dwdp.cli import commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorrt_llm_dwdp",
        description="Distributed Weight Data Parallelism for MoE inference.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_entry=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._entry(args) or 0)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        # Bad input (config, checkpoint, peers) is reported as one line; --log-level DEBUG
        # shows where it came from.
        logging.getLogger(__name__).debug("command failed", exc_info=True)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
