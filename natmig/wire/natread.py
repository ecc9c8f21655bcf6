"""The agent's reader of NETCONF messages: bytes in, an element tree and a decoded edit-config out.

Small messages are parsed whole by lxml (their size bounded first by
:mod:`.xmlbounds`).  A large edit-config of nat-session entries takes one
of two fast paths, each proven equal to the general one by the differential
tests (tests/test_agent_canonical.py, test_agent_stream.py):

- entries written exactly as the codec writes them are read apart from the
  rest by the codec's canonical reader (:func:`parse_canonical`);
- any other large message is parsed incrementally, its entries decoded a
  batch at a time and dropped from the tree (:class:`Batches`).

The result is an :class:`~.problems.EditRequest`, or a
:class:`~.problems.DatastoreError` naming every problem.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable
from xml.sax.saxutils import quoteattr

from lxml import etree

from ..codec import EDIT_OPERATIONS, NETCONF_NS, Codec, EditEntry
from ..editentry import CompletedRun
from ..errors import CodecError
from ..model import format_key
from ..schema import LeafValueError
from ..statemodel import COMMON_NS
from .problems import DatastoreError, EditRequest, Problem, cap_problems, more_problems, problems_of_codec
from .state import CONTROL
from .xmlbounds import MAX_ELEMENTS, TooManyElements, count_nodes, strip_leading_space

_NC = f"{{{NETCONF_NS}}}"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True, remove_blank_text=False)


_LEAF_OPERATIONS = etree.XPath("*/*/@nc:operation", namespaces={"nc": NETCONF_NS})
_NESTED = etree.XPath("*/*/*")


def fast_entries(codec: Codec, config: Any) -> list[EditEntry] | None:
    """The list entries of a clean <config> (or list of entry elements) in one pass; None at the first oddity.

    The common case (a table written into a node) needs no per-entry error
    bookkeeping; anything unusual -- unknown or repeated leaves, bad values,
    missing keys, duplicates, leaf-level operations, leaves with children --
    returns None and the codec's :meth:`~natmig.codec.Codec.decode_edit_xml`
    decodes again and names every problem.  The leaf validators are the
    codec's own.
    """
    if not isinstance(config, list) and (_LEAF_OPERATIONS(config) or _NESTED(config)):
        return None  # a batch (a list) was checked by its caller, on the whole <config>
    ns = codec.ns
    # Tables repeat values (one public address, a few protocols, servers,
    # ports): each distinct text of a leaf is validated once per batch.
    by_tag: dict[str, tuple[str, Callable[[str], Any], dict[str, Any]]] = {f"{{{ns}}}{spec.name}": (spec.name, spec.parse, {}) for spec in codec.schema.leaves}
    list_tag = f"{{{ns}}}{codec.schema.list_name}"
    control_tag = f"{{{ns}}}{codec.schema.control_name}"
    op_attr = _NC + "operation"
    keys = codec.schema.keys
    out: list[EditEntry] = []
    append = out.append
    seen: set[Any] = set()
    try:
        for entry in config:
            if entry.tag != list_tag:
                if entry.tag == control_tag:
                    continue
                return None
            op = entry.get(op_attr)
            if op is not None and op not in EDIT_OPERATIONS:
                return None
            values: dict[str, Any] = {}
            for child in entry:
                name, parse, memo = by_tag[child.tag]
                text = child.text or ""
                v = memo.get(text, memo)
                if v is memo:
                    v = memo[text] = parse(text)
                values[name] = v
            if len(values) != len(entry):
                return None  # a leaf given twice
            key = tuple([values[k] for k in keys])
            seen.add(key)
            append(EditEntry(op, key, values))
    except (KeyError, LeafValueError, TypeError):
        return None
    if len(seen) != len(out):
        return None  # the same entry twice
    return out


_STATE_CONTROL = f"{{{COMMON_NS}}}{CONTROL}"


def _as_nat_control(codec: Codec, el: Any) -> None:
    """natmig-state's state-control/admit-new is nat-control/admit-new-sessions under its common name: renamed in place."""
    el.tag = f"{{{codec.ns}}}{codec.schema.control_name}"
    for leaf in el:
        if leaf.tag == f"{{{COMMON_NS}}}admit-new":
            leaf.tag = f"{{{codec.ns}}}admit-new-sessions"


def edit_request(codec: Codec, config: Any) -> EditRequest:
    """Split a <config> into list entries, whole-list operations and nat-control."""
    op_attr = _NC + "operation"
    req = EditRequest()
    problems: list[Problem] = []
    list_tag = f"{{{codec.ns}}}{codec.schema.list_name}"
    control_tag = f"{{{codec.ns}}}{codec.schema.control_name}"
    for child in config:
        if child.tag == _STATE_CONTROL:
            _as_nat_control(codec, child)
    for child in list(config):
        if child.tag == list_tag and not any(isinstance(c.tag, str) for c in child):
            # <nat-session nc:operation="remove"/>: the whole list.
            op = child.get(op_attr)
            if op not in ("delete", "remove"):
                problems.append(Problem("missing-element", "a list entry needs its key leaves (only delete/remove may name the whole list)", codec.schema.list_name, codec.schema.keys[0], "application"))
            req.list_operation = op
            config.remove(child)
        elif child.tag == control_tag:
            op = child.get(op_attr)
            if op is not None and op not in ("merge", "replace", "create", "delete", "remove"):
                problems.append(Problem("bad-attribute", f"unknown operation {op!r}", codec.schema.control_name, "", "protocol", info={"bad-attribute": "operation", "bad-element": codec.schema.control_name}))
            req.control_operation = op
    try:
        req.control = codec.decode_control_xml(config)
    except CodecError as e:
        problems.extend(problems_of_codec(e))
    fast = fast_entries(codec, config) if not problems else None
    if fast is not None:
        req.entries = fast
    else:
        try:
            req.entries = codec.decode_edit_xml(config)
        except CodecError as e:
            problems.extend(problems_of_codec(e))
    if problems:
        raise DatastoreError(problems)
    return req


class Batches:
    """An edit-config decoded while it is parsed, a few thousand entries at a time.

    A 100k-entry request is a ~30 MB document whose lxml tree alone takes
    ~230 MB; decoding entries as they complete and dropping their elements
    keeps the tree small.  The result is the same as decoding the whole
    <config> at once: batches are merged, duplicates across batches refused.
    """

    SIZE = 4096

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.list_tag = f"{{{codec.ns}}}{codec.schema.list_name}"
        self.req = EditRequest()
        self.problems: list[Problem] = []
        self.count = 0
        #: the entries are known to hold no key twice (the canonical reader checked).
        self.unique = False

    def take(self, config: Any, last: Any) -> int:
        """Decode the complete entries of <config> up to ``last``, then drop them from the tree; the nodes dropped.

        The parser may already hold the beginning of the next entry; it is
        left alone.  nat-control and whole-list elements stay for the final pass.
        """
        done = []
        for child in config:
            if child.tag == self.list_tag and len(child):
                done.append(child)
            if child is last:
                break
        entries = None if _LEAF_OPERATIONS(config) or _NESTED(config) else fast_entries(self.codec, done)
        if entries is None:
            # Something is wrong in this batch: let the codec name every problem.
            tmp = etree.Element(_NC + "config")
            tmp.extend(copy.deepcopy(c) for c in done)
            try:
                entries = self.codec.decode_edit_xml(tmp)
            except CodecError as e:
                self.problems = cap_problems(self.problems + problems_of_codec(e))
                entries = []
        self.req.entries.extend(entries)
        # What count_nodes counted for them: the entry, its leaves, its
        # attributes and the namespaces it declares (an estimate that errs
        # towards fewer, so the live count errs towards more).
        inherited = len(config.nsmap)
        dropped = 0
        for child in done:
            dropped += 1 + len(child) + len(child.attrib) + max(0, len(child.nsmap) - inherited)
            config.remove(child)
        return dropped

    def finish(self, rest: EditRequest | None, problems: list[Problem]) -> EditRequest:
        """The whole request: the batches plus what the final pass decoded."""
        if rest is not None:
            self.unique = self.unique and not rest.entry_count
            _merge(self.req, rest)
        problems = self.problems + problems
        keys = [] if self.unique else [e.key for e in self.req.entries]
        if len(set(keys)) != len(keys):
            seen: set[Any] = set()
            dups = [k for k in keys if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
            problems += [Problem("bad-element", "the same entry appears twice in the request", format_key(k)) for k in dups[:10]]
            if len(dups) > 10:
                problems.append(more_problems(len(dups) - 10))
        if problems:
            raise DatastoreError(cap_problems(problems))
        return self.req


def _merge(into: EditRequest, part: EditRequest) -> None:
    if part.entry_count:  # asked only then: a completed run of ``into`` stays whole
        into.entries.extend(part.entries)
    if part.list_operation is not None:
        into.list_operation = part.list_operation
    if part.control is not None or part.control_operation is not None:
        into.control, into.control_operation = part.control, part.control_operation


#: Messages larger than this are parsed incrementally (see Batches).
STREAM_THRESHOLD = 1 << 20
#: Messages at least this large first try the canonical reader (see parse_canonical).
CANONICAL_THRESHOLD = 1 << 15

#: Stands in for the entries cut out of an edit-config while lxml reads the rest.
_MARK_NS = "urn:natmig:agent:entries-read-apart"
_MARK_TAG = f"{{{_MARK_NS}}}entries"
_MARK = f'<entries xmlns="{_MARK_NS}"/>'.encode()
_DECLARED_ENCODING = re.compile(rb"""\A(?:\xef\xbb\xbf)?<\?xml\s[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_XML_SPACE = " \t\r\n"
#: The most the rest of such a message may weigh: it is parsed whole, not streamed.
_ENVELOPE_LIMIT = 1 << 16


def _entry_operation(codec: Codec, nsmap: dict[str | None, str], attrs: bytes) -> str | None:
    """The nc:operation of an entry start tag with attribute text ``attrs``, read in the scope of its <config>.

    lxml reads the start tag alone, wrapped in the namespace declarations in
    scope where it stands, so prefixes, quoting and references mean what they
    mean in the whole document.  ValueError unless the tag is the list in
    the module's namespace with no attribute but a known nc:operation.
    """
    decls = "".join(f" xmlns:{p}={quoteattr(u)}" if p else f" xmlns={quoteattr(u)}" for p, u in nsmap.items())
    doc = f"<scope{decls}><{codec.schema.list_name}".encode() + attrs + b"/></scope>"
    try:
        el = etree.fromstring(doc, _PARSER)[0]
    except etree.XMLSyntaxError as e:
        raise ValueError(f"entry start tag: {e}") from None
    attrib = dict(el.attrib)
    op = attrib.pop(_NC + "operation", None)
    if el.tag != f"{{{codec.ns}}}{codec.schema.list_name}" or attrib or (op is not None and op not in EDIT_OPERATIONS):
        raise ValueError("not a plain entry start tag")
    return op


def parse_canonical(codec: Codec, message: bytes) -> tuple[Any, Batches] | None:
    """An edit-config whose <config> holds nothing but entries in the codec's own form; None for any other message.

    The entries are read by :class:`~natmig.canonical.CanonicalEntries` (~2.5x
    less CPU than lxml building elements for them) and lxml parses the rest of
    the message, with a marker element where the entries were: the marker
    must come out as the only child of rpc/edit-config/config, which proves
    the entries stood in element content there (not in a comment, CDATA or
    another element) and gives the namespaces in scope for their start tags.
    Everything else -- a bad value, a duplicate, another element beside the
    entries, a DTD, a foreign encoding -- returns None and the message takes
    the general path, which refuses or accepts it exactly as before.
    """
    reader = codec.canonical
    span = reader.span(message)
    if span is None:
        return None
    start, end = span
    head, tail = message[:start], message[end:]
    if len(head) + len(tail) > _ENVELOPE_LIMIT or b"<!" in head or not tail.lstrip().startswith(b"</"):
        return None  # other elements beside the entries, or a DTD (entities, default attributes)
    if b"encoding" in head:
        m = _DECLARED_ENCODING.match(head)
        if m is None or m.group(1).lower() not in (b"utf-8", b"us-ascii", b"ascii"):
            return None  # the entries' bytes were read as ASCII
    try:
        root = etree.fromstring(head + _MARK + tail, _PARSER)
    except etree.XMLSyntaxError:
        return None  # the general path words the error for the whole message
    marks = list(root.iter(_MARK_TAG))
    if len(marks) != 1:
        return None
    mark = marks[0]
    config = mark.getparent()
    edit = config.getparent() if config is not None else None
    rpc = edit.getparent() if edit is not None else None
    if (rpc is None or edit is None or rpc.getparent() is not None or rpc.tag != _NC + "rpc" or edit.tag != _NC + "edit-config"
            or config.tag != _NC + "config" or len(config) != 1
            or (config.text or "").strip(_XML_SPACE) or (mark.tail or "").strip(_XML_SPACE)):
        return None
    nsmap = config.nsmap
    entries = reader.decode(message, start, end, lambda attrs: _entry_operation(codec, nsmap, attrs), codec.complete_columns)
    if entries is None:
        return None
    config.remove(mark)
    batches = Batches(codec)
    batches.req = EditRequest(run=entries) if isinstance(entries, CompletedRun) else EditRequest(entries)
    batches.count = len(entries)
    batches.unique = True
    return root, batches


def parse_message(codec: Codec, message: bytes, max_elements: int = MAX_ELEMENTS) -> tuple[Any, Batches | None]:
    """The message's element tree; entries of a large edit-config come decoded beside it.

    :class:`TooManyElements` when the tree would hold more than
    ``max_elements`` nodes at once (checked before lxml builds them).
    """
    message = strip_leading_space(message)
    if len(message) >= CANONICAL_THRESHOLD:
        fast = parse_canonical(codec, message)
        if fast is not None:
            return fast
    if len(message) < STREAM_THRESHOLD:
        if (n := count_nodes(message)) > max_elements:
            raise TooManyElements(n, max_elements)
        return etree.fromstring(message, _PARSER), None
    list_tag = f"{{{codec.ns}}}{codec.schema.list_name}"
    parser = etree.XMLPullParser(events=("end",), tag=list_tag, resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)
    batches = Batches(codec)
    view = memoryview(message)
    step = 1 << 20
    # Nodes fed to lxml and not yet dropped with a decoded batch: what the
    # tree holds at most.  Checked before each piece is fed, so a refused
    # message never costs more than this bound's worth of tree.
    live = 0
    for i in range(0, len(message), step):
        piece = bytes(view[i : i + step])
        live += count_nodes(piece)
        if live > max_elements:
            raise TooManyElements(live, max_elements)
        parser.feed(piece)
        del piece
        for _, el in parser.read_events():
            config = el.getparent()  # type: ignore[union-attr]  # lxml-stubs: events=("end",) yields only elements
            if config is None or config.tag != _NC + "config":
                continue
            edit = config.getparent()
            if edit is None or edit.tag != _NC + "edit-config" or (rpc := edit.getparent()) is None or rpc.getparent() is not None:
                continue
            batches.count += 1
            if batches.count % batches.SIZE == 0:
                live -= batches.take(config, el)
    root = parser.close()
    return root, (batches if batches.count else None)
