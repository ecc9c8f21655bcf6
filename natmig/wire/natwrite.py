"""The nat-session list and nat-control as the agent writes them in get and get-config replies.

The codec's own encoding when every leaf but the defaults is wanted (the
fast path: RFC 6243 trim); chosen leaves, or every leaf with defaults
(report-all, report-all-tagged), through the general path here.
"""

from __future__ import annotations

from typing import Any

from ..codec import Codec
from ..model import NatSession

#: the attribute report-all-tagged puts on a leaf at its default (RFC 6243 6).
_WD = "urn:ietf:params:xml:ns:netconf:default:1.0"
DEFAULT_TAG = f' xmlns:wd="{_WD}" wd:default="true"'


def leaf_xml(spec: Any, v: Any, tagged: bool) -> str:
    tag = DEFAULT_TAG if tagged and not spec.is_key and v == spec.default else ""
    return f"<{spec.name}{tag}>{spec.text(v)}</{spec.name}>"


def encode_sessions(codec: Codec, sessions: list[NatSession], leaves: set[str] | None, report_all: bool, tagged: bool = False) -> bytes:
    if leaves is None and not report_all:
        return codec.encode_xml(sessions, root=None)
    # The slow, general path: chosen leaves only, or every leaf with defaults.
    name = codec.schema.list_name
    specs = [s for s in codec.schema.leaves if leaves is None or s.name in leaves]
    parts = []
    for s in sessions:
        inner = []
        for spec in specs:
            v = getattr(s, spec.name)
            if v is None or (not report_all and not spec.is_key and not spec.mandatory and v == spec.default):
                continue
            inner.append(leaf_xml(spec, v, tagged))
        parts.append(f'<{name} xmlns="{codec.ns}">{"".join(inner)}</{name}>')
    return "".join(parts).encode()


def encode_control(codec: Codec, values: dict[str, Any], report_all: bool, tagged: bool = False) -> bytes:
    if report_all:
        name = codec.schema.control_name
        inner = "".join(leaf_xml(s, values.get(s.name, s.default), tagged) for s in codec.schema.control_leaves)
        return f'<{name} xmlns="{codec.ns}">{inner}</{name}>'.encode()
    if all(values.get(s.name, s.default) == s.default for s in codec.schema.control_leaves):
        return b""  # trim: a container holding only defaults is not shown
    return codec.encode_control_xml(values)
