"""The `natmig` command.  Each component registers its own subcommands.

A component module named in ``COMMAND_MODULES`` exposes
``register(subparsers) -> None``; each parser it adds sets ``func``, a callable
taking the parsed arguments and returning the exit status.

No error reaches the user as a Python traceback: natmig's own errors carry
their exit status (:mod:`natmig.errors`), a file that cannot be opened is a
usage error, and anything else is reported as a bug in one line (``-vv``
logs the traceback).  The exit statuses are listed in docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Iterator, Sequence

from . import __version__
from .errors import EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_STATUSES, EXIT_USAGE, NatmigError

log = logging.getLogger("natmig")

COMMAND_MODULES = (
    "natmig.codec_cli",
    "natmig.agent.cli",
    "natmig.testbed.cli",
    "natmig.controller.cli",
    "natmig.controller.node_cli",
)

EXIT_STATUS_EPILOG = "exit status:\n" + "".join(f"  {code:<4} {text}\n" for code, text in EXIT_STATUSES)


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the subcommand (`natmig -v validate x` and
    # `natmig validate -v x`).  Below the top the default is SUPPRESS, so a
    # subcommand's parser, whose values are copied over the top's, does not
    # reset a -v given before it.
    default = 0 if top else argparse.SUPPRESS
    group = parser.add_argument_group("output")
    for flags, dest, text in ((("-v", "--verbose"), "verbose", "more logging (-vv: debug, and tracebacks of internal errors)"),
                              (("-q", "--quiet"), "quiet", "less output: only errors (and, for migrate, no per-phase progress)")):
        # A subcommand that defines one of these itself keeps its own (its dest must be the same).
        free = [f for f in flags if f not in parser._option_string_actions]
        if free:
            group.add_argument(*free, dest=dest, action="count", default=default, help=text)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below ``parser``, each once (aliases share a parser)."""
    seen: set[int] = set()
    todo = [parser]
    while todo:
        p = todo.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    if id(child) not in seen:
                        seen.add(id(child))
                        todo.append(child)
                        yield child


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="natmig",
        description="Model-driven live migration of a stateful NAT (YANG, NETCONF, conntrack, Open vSwitch).",
        epilog=EXIT_STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"natmig {__version__}")
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # component not built yet; anything else is a real error
                continue
            raise
        mod.register(sub)
    for p in _subparsers(parser):
        _verbosity(p, top=False)
        # The error prefix names the command as typed ("natmig agent passwd").
        if p.get_default("command_name") is None:
            p.set_defaults(command_name=p.prog)
    return parser


def _report(args: argparse.Namespace, text: str) -> None:
    name = getattr(args, "command_name", None) or "natmig"
    print(f"{name}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = 1 + args.verbose - args.quiet  # 1: warnings, the default
    logging.basicConfig(
        level=logging.ERROR if level <= 0 else [logging.WARNING, logging.INFO, logging.DEBUG][min(level, 3) - 1],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(func(args) or 0)
    except NatmigError as e:
        _report(args, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`natmig node nat1 sessions | head`): say nothing more.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_FAILED
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # A path the user gave; the message names it.
        _report(args, f"{e.filename}: {e.strerror}" if e.filename else str(e))
        return EXIT_USAGE
    except OSError as e:
        _report(args, str(e))
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - the last net: a bug, reported in one line
        log.debug("internal error", exc_info=True)
        _report(args, f"internal error: {type(e).__name__}: {e} (a bug in natmig; run with -vv for the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
