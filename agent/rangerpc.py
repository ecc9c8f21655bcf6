"""The nat-session module's two operations for comparing tables by key range: ``get-range-digests`` and ``get-range-sessions``.

A migration's verify compares two nodes' tables.  When their whole digests
(nat-statistics) differ, it asks each for the digest of every key range
(:func:`natmig.model.key_range`) and reads only the sessions of the ranges
that differ: at 1,000,000 sessions with a few hundred differing, some
thousands of entries cross the network instead of the table twice.

This is the XML side only (one operation element in, the reply's children
out); the counting and reading are the datastore's and the provider's.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from ..model import RANGES, format_digest
from ..wire.problems import refuse

#: The operations' names in the nat-session module.
RANGE_DIGESTS = "get-range-digests"
RANGE_SESSIONS = "get-range-sessions"


def op_range_digests(server: Any, sess: Any, op: Any) -> list[bytes]:
    """<get-range-digests>: each non-empty key range's sessions and digest (a range left out holds none)."""
    for c in op:
        if isinstance(c.tag, str):
            raise refuse("unknown-element", f"<{RANGE_DIGESTS}> takes no parameter <{etree.QName(c).localname}>",
                         type="protocol", info={"bad-element": etree.QName(c).localname})
    ranges = server.datastore.range_digests()
    if not ranges:
        return [b"<ok/>"]
    ns = server.codec.ns
    # One element per range, the namespace declared on each (RFC 7950 7.14.4:
    # output nodes are children of rpc-reply).  65,536 ranges: ~6 MB.
    return ["".join(f'<range xmlns="{ns}"><id>{r}</id><sessions>{n}</sessions><digest>{format_digest(acc)}</digest></range>'
                    for r, (n, acc) in sorted(ranges.items())).encode()]


def op_range_sessions(server: Any, sess: Any, op: Any) -> list[bytes]:
    """<get-range-sessions>: the sessions of running whose key is in one of the ``range`` leaf-list's ranges."""
    ns = server.codec.ns
    wanted: set[int] = set()
    for c in op:
        if not isinstance(c.tag, str):
            continue
        q = etree.QName(c)
        if q.localname != "range" or q.namespace != ns:
            raise refuse("unknown-element", f"<{RANGE_SESSIONS}> takes no parameter <{q.localname}>",
                         type="protocol", info={"bad-element": q.localname})
        text = (c.text or "").strip()
        if not text.isdigit() or int(text) >= RANGES:
            raise refuse("invalid-value", f"<{RANGE_SESSIONS}>: range {text!r} is not an integer in 0..{RANGES - 1}", leaf="range")
        wanted.add(int(text))
    if not wanted:
        raise refuse("missing-element", f"<{RANGE_SESSIONS}> needs at least one <range>", type="protocol",
                     info={"bad-element": "range"})
    sessions = server.datastore.range_sessions(wanted)
    return [server.codec.encode_xml(sessions, root=None)] if sessions else [b"<ok/>"]


#: localname -> handler, for operations in the nat-session module's namespace.
OPERATIONS = {RANGE_DIGESTS: op_range_digests, RANGE_SESSIONS: op_range_sessions}
