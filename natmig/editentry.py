"""One list entry of an edit-config as decoded: its operation and the leaves it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import SessionKey
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
