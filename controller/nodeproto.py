"""What the NAT migration needs of a node's NETCONF client, and the optional features a client declares.

:class:`Node` is what every client has.  A client that can do more says so
in ``features`` (a class attribute), and the migration picks its copy and
verify strategies from that declaration, never by probing for methods:

- ``STATISTICS``: ``get_statistics()`` -> nat-statistics (count and digest);
  without it verify re-reads the table;
- ``TABLE_TEXT``: ``read_table(source, on_chunk)`` -> a
  :class:`~natmig.wire.natreply.TableReply` kept as text, and ``codec``;
- ``CHUNKS``: ``session_chunks(source, size, pieces)``: a copy into an
  idle target is streamed slice by slice;
- ``TEXT_EDIT``: ``edit_text(entries, target)``: an idle target gets the
  source's text forwarded undecoded (with ``TABLE_TEXT`` on the source);
- ``SESSIONS_AND_ADMISSION``: ``get_sessions_and_admission(source)`` in
  one request;
- ``RANGES``: ``get_range_digests()`` and ``get_range_sessions(ranges)``
  (the nat-session module's get-range-digests and get-range-sessions): a
  verify whose digests differ reads only the key ranges that differ
  (:mod:`.rangecheck`); without it, the whole tables.

:class:`~natmig.controller.netconf.NodeClient` declares them all.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Collection, Iterable, Iterator, Protocol

from ..codec import Codec
from ..model import NatSession, SessionKey
from ..wire.natreply import TableReply

STATISTICS = "statistics"
TABLE_TEXT = "table-text"
CHUNKS = "chunks"
TEXT_EDIT = "text-edit"
SESSIONS_AND_ADMISSION = "sessions-and-admission"
RANGES = "ranges"
#: every optional feature (NodeClient has them all)
ALL_FEATURES = frozenset({STATISTICS, TABLE_TEXT, CHUNKS, TEXT_EDIT, SESSIONS_AND_ADMISSION, RANGES})


class Node(Protocol):
    """What the migration needs of every NAT node's NETCONF client."""

    name: str
    #: the optional features this client has (see the module docstring)
    features: ClassVar[frozenset[str]]

    @property
    def capabilities(self) -> list[str]: ...
    def module_revision(self, module: str | None = None) -> str | None: ...
    def get_sessions(self, source: str = "running") -> list[NatSession]: ...
    def edit_sessions(self, sessions: Iterable[NatSession], target: str = "candidate", operation: str | None = "merge") -> None: ...
    def delete_sessions(self, keys: Iterable[SessionKey] | None = None, target: str = "candidate") -> None: ...
    def set_admission(self, admit: bool, target: str = "running") -> None: ...
    def get_admission(self, source: str = "running") -> bool: ...
    def commit(self, confirmed: bool = False, timeout: float | None = None, persist: str | None = None, persist_id: str | None = None) -> None: ...
    def cancel_commit(self, persist_id: str | None = None) -> None: ...
    def lock(self, target: str = "running") -> None: ...
    def unlock(self, target: str = "running") -> None: ...
    def discard(self) -> None: ...
    def subscribe(self) -> Any: ...
    def close(self) -> None: ...
    @property
    def connected(self) -> bool: ...


def has(node: Any, feature: str) -> bool:
    """Whether ``node`` declares ``feature``."""
    return feature in getattr(type(node), "features", frozenset())


class Counter(Node, Protocol):
    """``STATISTICS``."""

    def get_statistics(self) -> dict[str, Any]: ...


class TableReader(Node, Protocol):
    """``TABLE_TEXT``."""

    codec: Codec

    def read_table(self, source: str = "running", on_chunk: Callable[[bytes], None] | None = None, keep: bool = True) -> TableReply: ...


class ChunkSource(Node, Protocol):
    """``CHUNKS``."""

    def session_chunks(self, source: str = "running", size: int = 25_000, pieces: int = 1) -> Iterator[list[NatSession]]: ...


class TextTarget(Node, Protocol):
    """``TEXT_EDIT``."""

    def edit_text(self, entries: str, target: str = "candidate") -> None: ...


class BothReader(Node, Protocol):
    """``SESSIONS_AND_ADMISSION``."""

    def get_sessions_and_admission(self, source: str = "running") -> tuple[list[NatSession], bool]: ...


class RangeReader(Node, Protocol):
    """``RANGES``."""

    def get_range_digests(self) -> dict[int, tuple[int, int]]: ...
    def get_range_sessions(self, ranges: Collection[int]) -> list[NatSession]: ...
