"""A typed single-entry API over the pyangbind bindings generated from the module.

pyangbind checks every assignment against the module (ranges, enumerations,
patterns) and raises at the faulty leaf, which suits building or inspecting a
few sessions by hand.  It costs ~5 ms and ~130 KB per entry, so whole tables
go through :mod:`natmig.codec` instead; tests use both and check they agree.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyangbind.lib.pybindJSON as pybind_json

from .bindings.nat_session import nat_session as _Root
from .codec import default_codec
from .errors import CodecError, FieldError
from .model import FIELD_NAMES, NatSession, format_key


def new_root() -> Any:
    """An empty pyangbind root of the nat-session module."""
    return _Root()


def to_binding(sessions: Iterable[NatSession], root: Any | None = None) -> Any:
    """Add sessions to a pyangbind root (a new one by default), leaf by checked leaf.

    Raises :class:`CodecError` naming the entry and leaf pyangbind refused.
    """
    root = root if root is not None else new_root()
    codec = default_codec()
    for s in sessions:
        try:
            entry = root.nat_session.add(
                protocol=s.protocol, src_address=s.src_address, src_port=s.src_port,
                dst_address=s.dst_address, dst_port=s.dst_port,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CodecError([FieldError(format_key(s.key), "", f"pyangbind refused the key: {e}")]) from None
        for name in FIELD_NAMES[5:]:
            v = getattr(s, name)
            spec = codec.schema.leaf[name]
            if v is None or (v == spec.default and not spec.mandatory):
                continue
            try:
                setattr(entry, name, v)
            except (ValueError, TypeError) as e:
                msg = e.args[0].get("error-string", str(e)) if e.args and isinstance(e.args[0], dict) else str(e)
                raise CodecError([FieldError(format_key(s.key), name, f"{v!r}: {msg}")]) from None
    return root


def from_binding(root: Any) -> list[NatSession]:
    """The sessions of a pyangbind root, checked by the codec (mandatory leaves, defaults)."""
    doc = json.loads(pybind_json.dumps(root, mode="ietf"))
    return default_codec().decode_json(doc or {default_codec().json_name: []})
