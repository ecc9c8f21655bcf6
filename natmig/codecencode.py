"""The codec's compiled schema and its encoders: entries as XML and JSON, statistics, nat-control, events.

:class:`CodecEncoder` holds what a :class:`~natmig.codec.Codec` is built
from; the decoders build on it (:mod:`natmig.codecdecode`, :mod:`natmig.codec`).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Iterable, Iterator

from .canonical import CanonicalEntries
from .errors import CodecError, FieldError
from .model import FIELD_NAMES, NatSession
from .schema import Schema

NETCONF_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


class CodecEncoder:
    """A compiled schema and the encoders of its documents (a codec is a :class:`~natmig.codec.Codec`)."""

    def __init__(self, schema: Schema) -> None:
        if tuple(s.name for s in schema.leaves) != FIELD_NAMES:
            # NatSession and the module must name the same leaves in the same order.
            raise CodecError([FieldError(schema.list_name, "", f"module leaves {[s.name for s in schema.leaves]} != NatSession fields {list(FIELD_NAMES)}", "operation-failed")])
        self.schema = schema
        self.ns = schema.namespace
        self.json_name = f"{schema.module}:{schema.list_name}"
        self._list_tag = f"{{{self.ns}}}{schema.list_name}"
        self._stats_tag = f"{{{self.ns}}}{schema.stats_name}"
        self._control_tag = f"{{{self.ns}}}{schema.control_name}"
        self._by_tag = {f"{{{self.ns}}}{s.name}": s for s in schema.leaves}
        self._by_name = {s.name: s for s in schema.leaves}
        self._keys = schema.keys
        self._key_set = frozenset(schema.keys)
        self._mandatory = [s.name for s in schema.leaves if s.mandatory and not s.is_key]
        self._mandatory_set = frozenset(self._mandatory)
        self._when = [(s.name, s.when) for s in schema.leaves if s.when]
        self._defaults = {s.name: s.default for s in schema.leaves}
        self._optional = [s for s in schema.leaves if not s.mandatory]

    @cached_property
    def canonical(self) -> CanonicalEntries:
        """The strict reader of entries in this codec's own XML form (see :class:`CanonicalEntries`)."""
        return CanonicalEntries(self)

    # ------------------------------------------------------------------ encode

    def _entry_items(self, s: NatSession) -> Iterator[tuple[Any, str]]:
        for spec in self._optional:
            v = getattr(s, spec.name)
            if v is not None and v != spec.default:
                yield spec, v

    @property
    def optional_leaves(self) -> list[str]:
        """The names of the entry's optional leaves, in the order :meth:`encode_xml` writes them (after the mandatory ones)."""
        return [s.name for s in self._optional]

    def optional_leaf_xml(self, name: str, value: Any) -> str:
        """An optional leaf as :meth:`encode_xml` writes it inside an entry: "" when absent (None) or at its default."""
        spec = self._by_name[name]
        if value is None or value == spec.default:
            return ""
        return f"<{name}>{spec.text(value)}</{name}>"

    def encode_xml(self, sessions: Iterable[NatSession], root: str | None = "data") -> bytes:
        """Serialise sessions as XML list entries.

        ``root`` wraps them in a NETCONF ``<data>`` or ``<config>`` element; None
        gives the bare sequence of entries, for embedding into a reply.
        """
        ns = self.ns
        name = self.schema.list_name
        # Inside a root element the module namespace is declared once, as the
        # default namespace; a bare fragment declares it on every entry.
        head = f"<{name}>" if root else f'<{name} xmlns="{ns}">'
        tail = f"</{name}>"
        opt = [(s.name, s.default, s.text) for s in self._optional]
        parts: list[str] = []
        if root:
            parts.append(f'<nc:{root} xmlns:nc="{NETCONF_NS}" xmlns="{ns}">')
        append = parts.append
        for s in sessions:
            # f-string of the mandatory leaves: the hot path at 100k entries.
            append(
                f"{head}<protocol>{s.protocol}</protocol><src_address>{s.src_address}</src_address>"
                f"<src_port>{s.src_port}</src_port><dst_address>{s.dst_address}</dst_address>"
                f"<dst_port>{s.dst_port}</dst_port><translated_address>{s.translated_address}"
                f"</translated_address><translated_port>{s.translated_port}</translated_port>"
            )
            for lname, default, text in opt:
                v = getattr(s, lname)
                if v is not None and v != default:
                    append(f"<{lname}>{text(v)}</{lname}>")
            append(tail)
        if root:
            parts.append(f"</nc:{root}>")
        return "".join(parts).encode()

    def encode_statistics_xml(self, counters: dict[str, Any]) -> bytes:
        """The config-false statistics container, for <get> replies."""
        specs = {s.name: s for s in self.schema.stats_leaves}
        inner = "".join(f"<{k}>{specs[k].text(v)}</{k}>" for k, v in counters.items() if k in specs)
        name = self.schema.stats_name
        return f'<{name} xmlns="{self.ns}">{inner}</{name}>'.encode()

    def encode_control_xml(self, values: dict[str, Any]) -> bytes:
        """The nat-control container (trim mode: leaves at their default are omitted)."""
        inner = "".join(
            f"<{s.name}>{s.text(values[s.name])}</{s.name}>"
            for s in self.schema.control_leaves
            if values.get(s.name, s.default) != s.default
        )
        name = self.schema.control_name
        return f'<{name} xmlns="{self.ns}">{inner}</{name}>'.encode()

    def encode_event_xml(self, event: str, session: NatSession) -> bytes:
        """A ``nat-session-event`` notification body ("created" or "destroyed")."""
        inner = self.encode_xml([session], root=None).decode()
        # The entry's leaves, re-wrapped in the notification's `session` container.
        leaves = inner[inner.index(">") + 1 : inner.rindex("<")]
        return (
            f'<nat-session-event xmlns="{self.ns}"><event>{event}</event>'
            f"<session>{leaves}</session></nat-session-event>"
        ).encode()

    def to_json_obj(self, sessions: Iterable[NatSession]) -> dict[str, Any]:
        """The RFC 7951 JSON object of a table (module-qualified top-level name)."""
        out = []
        for s in sessions:
            d: dict[str, Any] = {
                "protocol": s.protocol,
                "src_address": s.src_address,
                "src_port": s.src_port,
                "dst_address": s.dst_address,
                "dst_port": s.dst_port,
                "translated_address": s.translated_address,
                "translated_port": s.translated_port,
            }
            for spec, v in self._entry_items(s):
                d[spec.name] = v
            out.append(d)
        return {self.json_name: out}

    def encode_json(self, sessions: Iterable[NatSession], indent: int | None = None) -> bytes:
        """Serialise sessions as RFC 7951 JSON."""
        return json.dumps(self.to_json_obj(sessions), indent=indent, separators=None if indent else (",", ":")).encode()
