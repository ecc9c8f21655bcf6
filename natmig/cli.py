"""The `natmig` command.  Each component registers its own subcommands.

A component module named in ``COMMAND_MODULES`` exposes
``register(subparsers) -> None``; each parser it adds sets ``func``, a callable
taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from . import __version__
from .errors import NatmigError

COMMAND_MODULES = (
    "natmig.codec_cli",
    "natmig.agent.cli",
    "natmig.testbed.cli",
    "natmig.controller.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="natmig",
        description="Model-driven live migration of a stateful NAT (YANG, NETCONF, conntrack, Open vSwitch).",
    )
    parser.add_argument("--version", action="version", version=f"natmig {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # component not built yet; anything else is a real error
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except NatmigError as e:
        print(f"natmig {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
