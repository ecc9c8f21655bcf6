"""NETCONF XML of any state module: its list entries, natmig-state's containers, edits.

The generic side of the wire: entries of a :class:`~natmig.statemodel.StateList`
as tuples, read and written with lxml and checked by the module's per-leaf
validators.  It is built for the tables a state agent serves from memory
and for a controller that knows no network function; nat-session's 100k-entry
fast paths stay in :mod:`natmig.codec` until they move behind this seam.

Output follows RFC 6243 "trim" mode unless asked otherwise.  A document is
accepted whole or refused whole: :class:`~natmig.errors.CodecError` lists
every problem found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence
from xml.sax.saxutils import escape

from lxml import etree

from ..codec import DEFAULT_ERROR_LIMIT, EDIT_OPERATIONS, NETCONF_NS, _Errors
from ..errors import CodecError, FieldError
from ..schema import LeafValueError
from ..statemodel import COMMON_NS, Entry, Key, StateList

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)
_OP = f"{{{NETCONF_NS}}}operation"
#: an operation on a leaf, and an element inside a leaf: either sends a document down the general path
_LEAF_OPERATIONS = etree.XPath("*/*/@nc:operation", namespaces={"nc": NETCONF_NS})
_NESTED = etree.XPath("*/*/*")
CONTROL = "state-control"
STATISTICS = "state-statistics"
CHANGE = "state-change"


@dataclass(frozen=True)
class Edit:
    """One list entry of an edit-config: its list, operation (None: the default one), key and the leaves it names."""

    list: StateList
    operation: str | None
    key: Key
    values: dict[str, Any]


@dataclass(frozen=True)
class Config:
    """A decoded <config> (or <data>): its list entries, and state-control's leaves when present."""

    edits: list[Edit]
    control: dict[str, Any] | None


def _root(data: bytes | str | Any) -> Any:
    if isinstance(data, (bytes, str)):
        try:
            return etree.fromstring(data.encode() if isinstance(data, str) else data, _PARSER)
        except etree.XMLSyntaxError as e:
            raise CodecError([FieldError("", "", f"malformed XML: {e}", "malformed-message")]) from None
    return data


def change_body(table: str, event: str, entry_xml: str) -> str:
    """A state-change notification body around one entry already in its list's XML (``table``: module:list)."""
    return (f'<{CHANGE} xmlns="{COMMON_NS}"><table>{escape(table)}</table><event>{event}</event>'
            f"<entry>{entry_xml}</entry></{CHANGE}>")


class Wire:
    """Reader and writer of the state lists of a set of modules, and of natmig-state's containers."""

    def __init__(self, lists: Iterable[StateList]) -> None:
        self.lists = tuple(lists)
        self._by_tag = {f"{{{l.namespace}}}{l.name}": l for l in self.lists}
        self._control_tag = f"{{{COMMON_NS}}}{CONTROL}"
        #: per list, its leaves by qualified tag (built once: an entry's decode is the hot loop of a copy).
        self._specs = {l: {f"{{{l.namespace}}}{s.name}": s for s in l.leaves} for l in self.lists}

    def list_by_qname(self, qname: str) -> StateList | None:
        """A list by ``module:list``."""
        return next((l for l in self.lists if l.qname == qname), None)

    # ------------------------------------------------------------------ write

    @staticmethod
    def entries_xml(lst: StateList, entries: Iterable[Entry], leaves: set[str] | None = None, report_all: bool = False) -> str:
        """Entries as list elements, each declaring the module's namespace (trim mode unless ``report_all``)."""
        specs = [(i, s) for i, s in enumerate(lst.leaves) if leaves is None or s.is_key or s.name in leaves]
        out = []
        head = f'<{lst.name} xmlns="{lst.namespace}">'
        tail = f"</{lst.name}>"
        for e in entries:
            inner = []
            for i, spec in specs:
                v = e[i]
                if v is None or (not report_all and not spec.mandatory and v == spec.default):
                    continue
                inner.append(f"<{spec.name}>{spec.text(v)}</{spec.name}>")
            out.append(head + "".join(inner) + tail)
        return "".join(out)

    @staticmethod
    def key_xml(lst: StateList, key: Key, operation: str | None = None) -> str:
        """An entry named by its key alone, with an ``nc:operation`` when given (delete, remove)."""
        op = f' xmlns:nc="{NETCONF_NS}" nc:operation="{operation}"' if operation else ""
        inner = "".join(f"<{s.name}>{s.text(v)}</{s.name}>" for s, v in zip(lst.leaves, key))
        return f'<{lst.name} xmlns="{lst.namespace}"{op}>{inner}</{lst.name}>'

    @staticmethod
    def control_xml(admit: bool, report_all: bool = False, tagged: bool = False, held: int | None = None) -> str:
        """state-control (trim: admit-new left out while at its default, open; tagged: RFC 6243's wd:default).

        ``held``: the state leaf of what the node holds now (a ``get``; None: the node holds nothing ever, left out).
        """
        held_xml = f"<held>{held}</held>" if held is not None else ""
        if admit and not report_all:
            return f'<{CONTROL} xmlns="{COMMON_NS}">{held_xml}</{CONTROL}>' if held_xml else ""
        tag = ' xmlns:wd="urn:ietf:params:xml:ns:netconf:default:1.0" wd:default="true"' if tagged and admit else ""
        return f'<{CONTROL} xmlns="{COMMON_NS}"><admit-new{tag}>{"true" if admit else "false"}</admit-new>{held_xml}</{CONTROL}>'

    @staticmethod
    def statistics_xml(tables: Sequence[tuple[str, int, str]]) -> str:
        """state-statistics: (module:list, entries, digest) per list."""
        rows = "".join(f"<table><name>{escape(n)}</name><entries>{c}</entries><digest>{d}</digest></table>" for n, c, d in tables)
        return f'<{STATISTICS} xmlns="{COMMON_NS}">{rows}</{STATISTICS}>'

    @staticmethod
    def change_xml(lst: StateList, event: str, entry: Entry) -> str:
        """A state-change notification body."""
        return change_body(lst.qname, event, Wire.entries_xml(lst, [entry]))

    # ------------------------------------------------------------------- read

    def decode(self, data: bytes | str | Any, with_operations: bool = True, limit: int = DEFAULT_ERROR_LIMIT) -> Config:
        """The list entries and state-control of a <config>/<data> element, type-checked, all or nothing.

        Elements of other modules are refused by name (unknown-namespace or
        unknown-element).  ``with_operations`` False refuses ``nc:operation``
        attributes (a reply carries none).
        """
        root = _root(data)
        errors = _Errors(limit)
        edits: list[Edit] = []
        control: dict[str, Any] | None = None
        # No leaf of the whole document has an operation or a child (two C-level scans): each
        # leaf then needs only its tag and text (a 100k-entry copy: ~2x less CPU in the loop).
        plain = not _LEAF_OPERATIONS(root) and not _NESTED(root)
        for el in root:
            if not isinstance(el.tag, str):
                continue
            lst = self._by_tag.get(el.tag)
            if lst is not None:
                edit = self._entry(lst, el, with_operations, errors, plain)
                if edit is not None:
                    edits.append(edit)
            elif el.tag == self._control_tag:
                control = self._control(el, errors) if control is None else control | self._control(el, errors)
            else:
                q = etree.QName(el)
                known = {l.namespace for l in self.lists} | {COMMON_NS}
                if q.namespace in known:
                    errors.add(q.localname, "", "not a state list or container this node serves", "unknown-element")
                else:
                    errors.add(q.localname, "", f"namespace {q.namespace!r} is not a module this node serves", "unknown-namespace")
        errors.raise_if_any()
        return Config(edits, control)

    def _operation(self, el: Any, path: str, errors: _Errors, allowed: bool) -> tuple[bool, str | None]:
        op = el.get(_OP)
        if op is None:
            return True, None
        if not allowed:
            errors.add(path, "", "an operation attribute is not allowed here", "bad-attribute")
            return False, None
        if op not in EDIT_OPERATIONS:
            errors.add(path, "", f"operation {op!r} is not one of {', '.join(sorted(EDIT_OPERATIONS))}", "bad-attribute")
            return False, None
        return True, op

    def _entry(self, lst: StateList, el: Any, with_operations: bool, errors: _Errors, plain: bool = False) -> Edit | None:
        ok, op = self._operation(el, lst.name, errors, with_operations)
        values: dict[str, Any] = {}
        specs = self._specs[lst]
        if plain:
            fast = self._plain_leaves(lst, specs, el, values)
            if fast is not None:
                return Edit(lst, op, fast, values) if ok else None
            values = {}  # something to report: the general loop below names it
        for child in el:
            spec = specs.get(child.tag)
            if spec is None and not isinstance(child.tag, str):  # a comment or processing instruction
                continue
            if spec is None:
                errors.add(lst.name, etree.QName(child).localname, f"not a leaf of {lst.name}", "unknown-element")
                ok = False
                continue
            if child.get(_OP) is not None:
                errors.add(lst.name, spec.name, "an operation on a single leaf is not supported; give it on the entry", "bad-attribute")
                ok = False
            if spec.name in values or len(child):
                errors.add(lst.name, spec.name, "appears more than once" if spec.name in values else "a leaf cannot contain elements", "bad-element")
                ok = False
                continue
            try:
                values[spec.name] = spec.parse(child.text or "")
            except LeafValueError as e:
                errors.add(lst.name, spec.name, str(e))
                ok = False
        missing = [k for k in lst.keys if k not in values]
        for k in missing:
            errors.add(lst.describe(values.get(k, "?") for k in lst.keys), k, "missing key leaf", "missing-element")
        if not ok or missing:
            return None
        return Edit(lst, op, tuple(values[k] for k in lst.keys), values)

    @staticmethod
    def _plain_leaves(lst: StateList, specs: dict[str, Any], el: Any, values: dict[str, Any]) -> tuple[Any, ...] | None:
        """An entry's leaves into ``values`` when each is a known leaf, given once, with a valid value: its key; else None.

        None leaves the naming of what is wrong to the general loop.
        """
        try:
            for child in el:
                spec = specs[child.tag]
                if spec.name in values:
                    return None
                values[spec.name] = spec.parse(child.text or "")
            return tuple([values[k] for k in lst.keys])
        except (KeyError, LeafValueError, TypeError):
            return None

    @staticmethod
    def _control(el: Any, errors: _Errors) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for child in el:
            if not isinstance(child.tag, str):
                continue
            q = etree.QName(child)
            if q.namespace != COMMON_NS or q.localname != "admit-new":
                errors.add(CONTROL, q.localname, f"not a leaf of {CONTROL}", "unknown-element")
                continue
            text = (child.text or "").strip()
            if text not in ("true", "false"):
                errors.add(CONTROL, "admit-new", f"{text!r} is not a boolean (true or false)")
                continue
            out["admit-new"] = text == "true"
        return out

    @staticmethod
    def complete(lst: StateList, values: dict[str, Any], errors: _Errors | None = None) -> Entry | None:
        """An entry from the leaves given: defaults applied, `when` and mandatory leaves checked.

        With ``errors`` None a problem raises :class:`CodecError`; else it is
        added there and None returned.
        """
        own = errors if errors is not None else _Errors(DEFAULT_ERROR_LIMIT)
        row: list[Any] = []
        ok = True
        for spec in lst.leaves:
            v = values.get(spec.name, spec.default)
            if spec.when is not None and values.get(spec.when[0]) != spec.when[1]:
                if spec.name in values:
                    own.add(lst.describe(values.get(k) for k in lst.keys), spec.name, f"only allowed when {spec.when[0]} = '{spec.when[1]}'", "unknown-element")
                    ok = False
                v = None
            elif spec.mandatory and spec.name not in values:
                own.add(lst.describe(values.get(k) for k in lst.keys), spec.name, "missing mandatory leaf", "missing-element")
                ok = False
            row.append(v)
        if not ok:
            if errors is None:
                own.raise_if_any()
            return None
        return tuple(row)

    def entries(self, data: bytes | str | Any, lst: StateList) -> list[Entry]:
        """The complete entries of ``lst`` in a reply's <data> (other lists and state-control ignored)."""
        cfg = self.decode(data, with_operations=False)
        errors = _Errors(DEFAULT_ERROR_LIMIT)
        out = [e for ed in cfg.edits if ed.list is lst and (e := self.complete(lst, ed.values, errors)) is not None]
        errors.raise_if_any()
        return out


def read_statistics(data: Any) -> dict[str, tuple[int, str]]:
    """state-statistics of a <get> reply's <data>: module:list -> (entries, digest)."""
    out: dict[str, tuple[int, str]] = {}
    for t in _root(data).iter(f"{{{COMMON_NS}}}table"):
        name = t.findtext(f"{{{COMMON_NS}}}name") or ""
        try:
            out[name] = (int(t.findtext(f"{{{COMMON_NS}}}entries") or "0"), t.findtext(f"{{{COMMON_NS}}}digest") or "")
        except ValueError:
            raise CodecError([FieldError(STATISTICS, "entries", f"table {name}: not a number")]) from None
    return out


def read_held(data: Any) -> int | None:
    """state-control/held of a reply's <data>: packets the node holds now (None: it does not report any)."""
    el = _root(data).find(f".//{{{COMMON_NS}}}held")
    if el is None:
        return None
    try:
        return int((el.text or "").strip())
    except ValueError:
        raise CodecError([FieldError(CONTROL, "held", f"{el.text!r} is not a number")]) from None


def read_admission(data: Any) -> bool:
    """state-control/admit-new of a reply's <data> (absent: its default, true)."""
    el = _root(data).find(f".//{{{COMMON_NS}}}admit-new")
    return el is None or (el.text or "").strip() != "false"
