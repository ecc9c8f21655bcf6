"""What a refused request is, in NETCONF terms, and what a decoded edit-config is.

The seam between the wire layer and the agent's datastores: the readers of
:mod:`.natread` turn bytes into an :class:`EditRequest`, or refuse them
with a :class:`DatastoreError` listing one :class:`Problem` per rpc-error
(RFC 6241 4.3) that the agent's RPC layer writes out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..codec import EditEntry
from ..editentry import CompletedRun
from ..model import SessionKey
from ..errors import AgentError, CodecError


@dataclass(frozen=True)
class Problem:
    """One reason a request was refused, in NETCONF terms (becomes one rpc-error).

    ``path`` is an entry as :func:`~natmig.model.format_key` names it, or a
    container name; ``leaf`` the leaf at fault; ``info`` extra error-info
    elements (e.g. ``{"session-id": "3"}``).
    """

    tag: str
    message: str
    path: str = ""
    leaf: str = ""
    type: str = "application"
    app_tag: str = ""
    info: dict[str, str] = field(default_factory=dict)


class DatastoreError(AgentError):
    """A request was refused; ``problems`` holds one :class:`Problem` per rpc-error."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{p.tag}: {p.path}{'/' + p.leaf if p.leaf else ''} {p.message}" for p in self.problems[:5]))


def refuse(tag: str, message: str, **kw: Any) -> DatastoreError:
    """A one-problem :class:`DatastoreError`."""
    return DatastoreError([Problem(tag, message, **kw)])


@dataclass(frozen=True)
class MoreProblems(Problem):
    """Stands for ``count`` problems left out of a reply (past :data:`PROBLEM_LIMIT`)."""

    count: int = 0


#: rpc-errors listed in one reply; the rest are counted in a last "... and N more errors".
PROBLEM_LIMIT = 100


def more_problems(count: int, type_: str = "application") -> MoreProblems:
    """The "... and N more errors" rpc-error."""
    return MoreProblems("invalid-value", f"... and {count} more errors", type=type_, count=count)


def cap_problems(problems: Sequence[Problem], limit: int = PROBLEM_LIMIT) -> list[Problem]:
    """At most ``limit`` problems, then one :class:`MoreProblems` counting every other.

    Problems gathered in parts (a large edit-config decoded batch by batch)
    each carry their own count of what they left out; the counts add up here.
    """
    listed = [p for p in problems if not isinstance(p, MoreProblems)]
    more = sum(p.count for p in problems if isinstance(p, MoreProblems)) + max(0, len(listed) - limit)
    out = listed[:limit]
    if more:
        out.append(more_problems(more, next((p.type for p in problems if isinstance(p, MoreProblems)), "application")))
    return out


def problems_of_codec(e: CodecError, type_: str = "application") -> list[Problem]:
    """The codec's field errors as problems (the codec already chose each error-tag)."""
    out = [Problem(f.tag, f.message, f.path if f.path != "document" else "", f.leaf, "rpc" if f.tag == "malformed-message" else type_) for f in e.errors]
    if e.more:
        out.append(more_problems(e.more, type_))
    return out


class EditRequest:
    """An edit-config, decoded: list entries, whole-list operation, nat-control changes.

    The entries may come as one :class:`~natmig.editentry.CompletedRun` (the
    canonical reader's, for a document of plain entries): :attr:`run` hands
    it to a planner that takes it whole, and :attr:`entries` expands it into
    entries one by one at the first ask, so that no reader of the request
    can miss one.
    """

    __slots__ = ("_entries", "_run", "list_operation", "control", "control_operation")

    def __init__(self, entries: list[EditEntry] | None = None, list_operation: str | None = None,
                 control: dict[str, Any] | None = None, control_operation: str | None = None, run: CompletedRun | None = None) -> None:
        self._entries: list[EditEntry] = entries if entries is not None else []
        self._run = run
        #: delete/remove of the whole nat-session list (an entry element with no keys).
        self.list_operation = list_operation
        #: nat-control leaves named in the request (None: nat-control not in it).
        self.control = control
        self.control_operation = control_operation

    @property
    def entries(self) -> list[EditEntry]:
        """The list entries one by one (a completed run is expanded into them here, once)."""
        if self._run is not None:
            run, self._run = self._run, None
            self._entries[:0] = run.entries()
        return self._entries

    @entries.setter
    def entries(self, entries: list[EditEntry]) -> None:
        self._entries, self._run = entries, None

    @property
    def run(self) -> CompletedRun | None:
        """The entries as one completed run, while that is all of them and none was asked for one by one."""
        return self._run if not self._entries else None

    @property
    def entry_count(self) -> int:
        """How many list entries the request names, without expanding a run."""
        return len(self._entries) + (len(self._run) if self._run is not None else 0)

    def keys(self) -> list[SessionKey]:
        """The keys of the entries, in request order, without expanding a run."""
        head = self._run.keys if self._run is not None else []
        return [*head, *(e.key for e in self._entries)]

    def clear_entries(self) -> None:
        """Drop the entries (a datastore consumed the request; at 100k they are tens of MB)."""
        self._entries, self._run = [], None

    def _fields(self) -> tuple[Any, ...]:
        return (self.entries, self.list_operation, self.control, self.control_operation)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EditRequest) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaced

    def __repr__(self) -> str:
        return (f"EditRequest(entries={self.entries!r}, list_operation={self.list_operation!r}, "
                f"control={self.control!r}, control_operation={self.control_operation!r})")
