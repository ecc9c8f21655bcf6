"""The manual page and the shell completions of `natmig`, generated from its own argparse parsers.

``make man`` runs ``python -m natmig.manual``, which writes ``man/natmig.1``
(argparse-manpage), ``completion/natmig`` (bash) and ``completion/_natmig``
(zsh) (shtab); the package installs them where man and the shells look
(pyproject's data-files).  They are generated, never edited by hand, and a
test fails when they are stale (as for the bindings).  The two generators are
the ``docs`` extra; nothing else of natmig imports this module.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import shtab
from argparse_manpage.manpage import Manpage

from . import __version__
from .cli import _subparsers, build_parser
from .errors import EXIT_STATUSES

ROOT = Path(__file__).resolve().parents[1]
#: generated file -> what makes it
OUTPUTS = ("man/natmig.1", "completion/natmig", "completion/_natmig")
#: options whose argument is a path: the shells complete file names there
PATH_METAVARS = {"FILE", "DIR"}


def _roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped."""
    return text.replace("\\", "\\\\").replace("-", "\\-")


EXTRA_SECTIONS = ".SH EXIT STATUS\n" + "".join(f".TP\n.B {code}\n{_roff(text)}\n" for code, text in EXIT_STATUSES) + """.SH ENVIRONMENT
.TP
.B NATMIG_INVENTORY
the inventory \\fBnatmig node\\fR reads when \\-\\-inventory is not given
.TP
.B NOTIFY_SOCKET
set by systemd for \\fBnatmig agent\\fR (Type=notify): READY=1 is sent there once it listens
.SH FILES
.TP
.I /etc/natmig/agent/NAME.toml
the config of \\fBnatmig-agent@NAME.service\\fR: one key per flag of \\fBnatmig agent\\fR
.SH SEE ALSO
.BR conntrack (8),
.BR ovs\\-ofctl (8),
.BR systemd.service (5);
docs/cli.md, docs/agent.md and docs/controller.md in the natmig sources
"""


def _parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.epilog = None  # the exit statuses: EXTRA_SECTIONS has them as a man page section
    for p in [parser, *_subparsers(parser)]:
        for action in p._actions:
            if action.metavar in PATH_METAVARS or action.dest in ("file",):
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return parser


def man_page(date: str | None = None) -> str:
    """The roff source of natmig(1)."""
    page = Manpage(_parser(), {
        "project_name": "natmig", "version": __version__, "manual_title": "natmig manual", "manual_section": 1,
        "description": "live migration of a stateful NAT: YANG, NETCONF, conntrack and Open vSwitch",
        "date": date or time.strftime("%Y-%m-%d", time.gmtime()),
    })
    text = str(page).rstrip("\n")
    # The exit statuses and the rest go before the generated footer (AUTHORS/DISTRIBUTION), if any.
    return text + "\n" + EXTRA_SECTIONS


def completion(shell: str) -> str:
    """The completion script of natmig for ``shell`` (bash or zsh)."""
    return shtab.complete(_parser(), shell=shell)


def render() -> dict[str, str]:
    """Every generated file's text, by path under the source tree."""
    return {"man/natmig.1": man_page(), "completion/natmig": completion("bash"), "completion/_natmig": completion("zsh")}


def _same(path: Path, text: str) -> bool:
    # The man page's .TH line carries the day it was made: not a difference.
    def body(t: str) -> list[str]:
        return [line for line in t.splitlines() if not line.startswith(".TH ")]
    return path.exists() and body(path.read_text()) == body(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the files under the source tree (``--check``: only say which are stale, exit 1 if any)."""
    ap = argparse.ArgumentParser(prog="python -m natmig.manual", description=__doc__)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated file is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree (default: this checkout)")
    args = ap.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = args.root / rel
        if _same(path, text):
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for rel in stale:
        print(f"{rel}: {'stale: run make man' if args.check else 'written'}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
