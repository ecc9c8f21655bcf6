"""Bulk codec between a nat-session table and NETCONF XML / RFC 7951 JSON.

Built for tables of 100,000 sessions: entries are plain :class:`NatSession`
records, values are checked by the per-leaf validators that
:mod:`natmig.schema` compiles from the YANG module, and XML is written as text
(validated values need no escaping) and read with lxml.  A document is
accepted whole or refused whole: :class:`CodecError` lists every problem (up to
``limit``) and nothing partial is returned.

Output follows RFC 6243 "trim" mode: a leaf equal to its default is omitted.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterable

from lxml import etree

from .codecdecode import DEFAULT_ERROR_LIMIT, CodecDecoder, _Errors
from .codecencode import NETCONF_NS
from .editentry import EDIT_OPERATIONS, EditEntry
from .gcpause import gc_paused
from .model import FIELD_NAMES, NatSession, SessionKey, format_key
from .schema import LeafValueError, load_schema


class Codec(CodecDecoder):
    """Encoder and decoder for one compiled schema (use :func:`default_codec`).

    Its schema and encoders are :class:`~natmig.codecencode.CodecEncoder`'s, the
    readers its decoders share :class:`~natmig.codecdecode.CodecDecoder`'s.
    """

    def decode_xml(self, data: bytes | str | Any, limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
        """Parse and validate an XML document (or lxml element) of nat-session entries.

        The document is a ``<data>``/``<config>`` element holding entries, or a
        single entry.  Raises :class:`CodecError` listing every problem.
        """
        errors = _Errors(limit)
        out: list[NatSession] = []
        with gc_paused():
            entries = self._entries_of(data, errors)
            by_tag = self._by_tag
            # Fast path: an entry whose leaves all parse, with no repeats,
            # completes inline; anything odd goes the slow way, which names
            # every problem.
            defaults = self._defaults
            keys = self._keys
            mandatory = self._mandatory
            when = self._when
            append = out.append
            for entry in entries:
                values: dict[str, Any] = {}
                n = 0
                try:
                    for child in entry:
                        spec = by_tag[child.tag]
                        values[spec.name] = spec.parse(child.text or "")
                        n += 1
                except (KeyError, LeafValueError):
                    n = -1
                if n != len(values) or len(entry) != n:
                    bad: set[str] = set()
                    values = self._leaves_xml(entry, errors, bad)
                    if self._check_keys(values, errors, bad):
                        s = self.complete(values, errors, bad)
                        if s is not None:
                            append(s)
                    continue
                row = None
                for m in mandatory:
                    if m not in values:
                        break
                else:
                    for k in keys:
                        if k not in values:
                            break
                    else:
                        row = dict(defaults)
                        for lname, (cond, want) in when:
                            if values[cond] != want:
                                if lname in values:
                                    row = None
                                    break
                                row[lname] = None
                if row is None:
                    if self._check_keys(values, errors, set()):
                        s = self.complete(values, errors)
                        if s is not None:
                            append(s)
                    continue
                row.update(values)
                append(NatSession(*[row[f] for f in FIELD_NAMES]))
            self._check_unique(out, errors)
        errors.raise_if_any()
        return out

    def decode_edit_xml(self, data: bytes | str | Any, limit: int = DEFAULT_ERROR_LIMIT) -> list[EditEntry]:
        """Parse the nat-session entries of an edit-config ``<config>``, with their operations.

        Leaves are type-checked; defaults and mandatory leaves are not applied
        (that depends on the operation and on what the datastore holds).
        """
        errors = _Errors(limit)
        out: list[EditEntry] = []
        op_attr = f"{{{NETCONF_NS}}}operation"
        seen: dict[SessionKey, int] = {}
        for entry in self._entries_of(data, errors):
            op = entry.get(op_attr)
            bad: set[str] = set()
            values = self._leaves_xml(entry, errors, bad)
            if op is not None and op not in EDIT_OPERATIONS:
                errors.add(self._path(values), "", f"unknown operation {op!r}", "bad-attribute")
                continue
            for child in entry:
                if child.get(op_attr) is not None:
                    errors.add(self._path(values), etree.QName(child).localname, "operations on single leaves are not supported; edit the whole entry", "operation-not-supported")
            if self._check_keys(values, errors, bad):
                key = tuple(values[k] for k in self._keys)
                if key in seen:
                    errors.add(format_key(key), "", "the same entry appears twice in the request", "bad-element")
                seen[key] = 1
                out.append(EditEntry(op, key, values))
        errors.raise_if_any()
        return out

    def decode_json(self, data: bytes | str | dict[str, Any], limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
        """Parse and validate an RFC 7951 JSON document of nat-session entries."""
        with gc_paused():
            return self._decode_json(data, limit)

    def _decode_json(self, data: bytes | str | dict[str, Any], limit: int) -> list[NatSession]:
        errors = _Errors(limit)
        out: list[NatSession] = []
        doc: Any = data
        if isinstance(data, (bytes, str)):
            if not (data.strip() if isinstance(data, str) else data.strip()):
                errors.add("document", "", "empty document", "malformed-message")
                errors.raise_if_any()
            try:
                doc = json.loads(data)
            except ValueError as e:
                errors.add("document", "", f"malformed JSON: {e}", "malformed-message")
                errors.raise_if_any()
        if not isinstance(doc, dict):
            errors.add("document", "", "top level must be a JSON object", "malformed-message")
            errors.raise_if_any()
        entries: list[Any] = []
        for name, value in doc.items():
            if name == self.json_name:
                if not isinstance(value, list):
                    errors.add("document", name, "a list must be a JSON array", "bad-element")
                else:
                    entries = value
            elif name.partition(":")[0] != self.schema.module:
                errors.add("document", name, f"unknown module {name.partition(':')[0]!r} (names must be qualified as {self.json_name!r})", "unknown-namespace")
            else:
                errors.add("document", name, "unknown element at top level" if name != f"{self.schema.module}:{self.schema.stats_name}" else "state data (config false) cannot be written", "unknown-element")
        by_name = self._by_name
        prefix = self.schema.module + ":"
        for obj in entries:
            if not isinstance(obj, dict):
                errors.add(self.schema.list_name, "", "a list entry must be a JSON object", "bad-element")
                continue
            values: dict[str, Any] = {}
            raw: dict[str, Any] = {}
            bad: set[str] = set()
            problems = []
            for name, v in obj.items():
                spec = by_name.get(name[len(prefix):] if name.startswith(prefix) else name)
                if spec is None:
                    problems.append((name, "unknown element in nat-session", "unknown-element"))
                    continue
                try:
                    values[spec.name] = spec.parse_json(v)
                except LeafValueError as e:
                    problems.append((spec.name, str(e), "invalid-value"))
                    bad.add(spec.name)
                    raw[spec.name] = v
            for leaf, msg, tag in problems:
                errors.add(self._path({**raw, **values}), leaf, msg, tag)
            if self._check_keys(values, errors, bad):
                s = self.complete(values, errors, bad)
                if s is not None:
                    out.append(s)
        self._check_unique(out, errors)
        errors.raise_if_any()
        return out


_default: Codec | None = None
_default_lock = threading.Lock()


def default_codec() -> Codec:
    """The codec of yang/nat-session.yang, compiled on first use (once, whichever thread asks first)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Codec(load_schema())
    return _default


def encode_xml(sessions: Iterable[NatSession], root: str | None = "data") -> bytes:
    """Serialise sessions as NETCONF XML (see :meth:`Codec.encode_xml`)."""
    return default_codec().encode_xml(sessions, root)


def decode_xml(data: bytes | str | Any, limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
    """Parse and validate NETCONF XML (see :meth:`Codec.decode_xml`)."""
    return default_codec().decode_xml(data, limit)


def encode_json(sessions: Iterable[NatSession], indent: int | None = None) -> bytes:
    """Serialise sessions as RFC 7951 JSON."""
    return default_codec().encode_json(sessions, indent)


def decode_json(data: bytes | str | dict[str, Any], limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
    """Parse and validate RFC 7951 JSON."""
    return default_codec().decode_json(data, limit)
