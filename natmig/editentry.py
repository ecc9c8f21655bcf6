"""One list entry of an edit-config as decoded: its operation and the leaves it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import FIELD_NAMES, NatSession, SessionKey
from .slotinit import fast_init

#: Operations of an edit-config entry (RFC 6241 7.2).
EDIT_OPERATIONS = frozenset({"merge", "replace", "create", "delete", "remove"})


@fast_init
@dataclass(frozen=True, slots=True)
class EditEntry:
    """One list entry of an edit-config: its operation and the leaves it names.

    ``operation`` is None when the entry carries no ``nc:operation`` attribute
    (the default-operation applies).  ``values`` holds only the leaves present
    in the request, already type-checked; :meth:`~natmig.codec.Codec.complete` fills in
    defaults and checks mandatory leaves for the operations that create.
    """

    operation: str | None
    key: SessionKey
    values: dict[str, Any]


@dataclass(frozen=True)
class CompletedRun:
    """The entries of one edit-config that their reader completed on its own: one operation, a NatSession each.

    The canonical reader gives this for a document of entries that all carry
    the same start tag, each complete alone (its mandatory leaves there, no
    leaf outside its ``when``), no key twice: what a migration forwards into
    a target that holds none of them.  A planner writes ``sessions`` as they
    are where the datastore holds none of the ``keys`` (a 100k copy:
    ~0.2 s of the target's CPU less than completing and planning the
    entries one by one); anything else takes :meth:`entries`, which equal
    what the reader gives one by one for the same text.
    """

    operation: str | None
    keys: list[SessionKey]
    #: each entry completed: defaults filled in, ``when`` applied (what Codec.complete makes of its leaves)
    sessions: list[NatSession]
    #: per leaf in module order (NatSession's fields), the value each entry gave (None: the leaf was absent)
    given: list[list[Any]]

    def __len__(self) -> int:
        return len(self.keys)

    def entries(self) -> list[EditEntry]:
        """The same entries one by one, each with only the leaves it gave."""
        op = self.operation
        return [EditEntry(op, k, {n: v for n, v in zip(FIELD_NAMES, row) if v is not None}) for k, row in zip(self.keys, zip(*self.given))]
