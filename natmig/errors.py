"""The one exception root of natmig, with a subclass per layer.

Every error natmig raises on purpose derives from :class:`NatmigError`, so a
caller that wants "anything natmig refused" catches one class, and a caller
that cares about the layer catches the subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Exit statuses of the `natmig` command (docs/cli.md).  Scripts branch on
# them, so each says what an operator must do next, not which code failed.
EXIT_OK = 0
#: the command failed and changed nothing (or rolled back what it changed, as read back)
EXIT_FAILED = 1
#: bad command line, or a file (inventory, config, document) missing, unreadable or invalid
EXIT_USAGE = 2
#: the command failed and what it read back is not where it started: run `natmig recover`
EXIT_ATTENTION = 3
#: a bug in natmig (the message asks for -vv, which logs the traceback)
EXIT_INTERNAL = 70
#: interrupted (Ctrl-C), as shells report SIGINT
EXIT_INTERRUPTED = 130

#: every exit status with its meaning: `natmig --help`, the man page and docs/cli.md say the same
EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "failed; nothing was changed (or what was changed was rolled back, as read back)"),
    (EXIT_USAGE, "usage: bad arguments, or a file (inventory, config, document) missing or invalid"),
    (EXIT_ATTENTION, "failed, and the state needs attention: run the `natmig recover` command printed"),
    (EXIT_INTERNAL, "internal error (a bug: run again with -vv for the traceback)"),
    (EXIT_INTERRUPTED, "interrupted"),
)

#: a migration's outcome (read back from the nodes) -> the exit status it ends `natmig migrate` with
OUTCOME_EXIT = {"ok": EXIT_OK, "unchanged": EXIT_FAILED, "attention": EXIT_ATTENTION}


def outcome_exit(outcome: str, unchanged: str, attention: str, say: Callable[[str], None]) -> int:
    """The exit status of a migration's ``outcome``, after telling the user what it means (``say``).

    ``unchanged`` and ``attention`` are what to read back or run next, which
    differs by how the migration ran (one-shot NAT, generic engine, through
    a controller service); an unknown outcome counts as needing attention.
    """
    code = OUTCOME_EXIT.get(outcome, EXIT_ATTENTION)
    if code == EXIT_FAILED:
        say(f"natmig migrate: nothing was changed ({unchanged})")
    elif code == EXIT_ATTENTION:
        say(f"natmig migrate: the state needs attention: {attention}")
    return code


class NatmigError(Exception):
    """Root of every error natmig raises on purpose.

    ``exit_code`` is the status `natmig` exits with when this error ends a
    command; subclasses that mean "fix the input" say :data:`EXIT_USAGE`.
    """

    exit_code: int = EXIT_FAILED


class UsageError(NatmigError):
    """The command line, or a file it names, is missing, unreadable or invalid."""

    exit_code = EXIT_USAGE


class SchemaError(NatmigError):
    """The YANG module cannot be loaded or uses a construct natmig cannot enforce."""


@dataclass(frozen=True)
class FieldError:
    """One problem in a document: where, which leaf, why, and its NETCONF error-tag.

    ``path`` names the list entry by its key, e.g.
    ``nat-session[TCP 10.0.0.1 2526 203.0.113.100 80]``; ``leaf`` is the leaf
    (or element) at fault, empty when the fault is the entry or the document.
    """

    path: str
    leaf: str
    message: str
    tag: str = "invalid-value"

    def __str__(self) -> str:
        where = f"{self.path}/{self.leaf}" if self.leaf else self.path
        return f"{where}: {self.message}"


class CodecError(NatmigError):
    """A document was refused; ``errors`` lists every problem found (up to a limit).

    Nothing of a refused document is returned: decoding is all or nothing.
    """

    def __init__(self, errors: list[FieldError], more: int = 0) -> None:
        self.errors = list(errors)
        self.more = more
        lines = [str(e) for e in self.errors]
        if more:
            lines.append(f"... and {more} more errors")
        head = f"{len(self.errors) + more} error(s) in nat-session document"
        super().__init__(head + ":\n  " + "\n  ".join(lines))


class ProviderError(NatmigError):
    """The session provider (the node's kernel table) refused or failed an operation."""


class AgentError(NatmigError):
    """The NETCONF agent failed to start or serve."""


class TestbedError(NatmigError):
    """The emulated network could not be built, inspected or torn down."""

    __test__ = False  # not a pytest test class despite the name


class ControllerError(NatmigError):
    """A migration step failed; the message says which step and where traffic is."""
