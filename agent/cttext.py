"""The conntrack tool's text formats, read in bulk.

``conntrack -L`` (and ``conntrack -E``) print one line per tracked
connection; :func:`parse_table` turns such text into :class:`NatSession`
records, counting the lines that are not translated sessions.  The default
output is read rather than ``-o save`` because ``-o save`` omits the mark and
the translated ICMP echo identifier, and costs the same to dump.

Sessions are no longer written as ``conntrack -R`` lines: apply creates
them over ctnetlink (:mod:`.ctnetlink`), three times faster than the tool
loads them.  :func:`seen_reply` still decides here which status bits a
recreated session carries (the module has no leaf for them).

Everything here is pure text work, unit-tested without root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain, repeat
from typing import TYPE_CHECKING, Callable

from ..model import NatSession, digest_xor

if TYPE_CHECKING:
    from ..codec import Codec

#: A reply tuple as :attr:`NatSession.reply_key` spells it (protocol,
#: translated address, translated port, remote address, remote port).
ReplyKey = tuple[str, str, int, str, int]
#: The original tuple of a conntrack entry (protocol, src, sport, dst, dport).
EntryTuple = tuple[str, str, int, str, int]

#: conntrack's TCP state names that the module's tcp-state-type has (LISTEN is
#: what old kernels call SYN_SENT2).
TCP_STATES: dict[str, str] = {s: s for s in (
    "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
    "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2",
)} | {"LISTEN": "SYN_SENT2"}

# One line of `conntrack -L` / `conntrack -E` for TCP and UDP.  Optional parts:
# the event tag, the timeout (absent in some events), the TCP state, the
# counters (nf_conntrack_acct=1), [UNREPLIED], status tags and the mark.  The
# mark and [ASSURED] are captured here when they come in conntrack's usual
# order; the rest of the line is searched only when they do not.
_PORTS = re.compile(
    r"^[ \t]*(?:\[(NEW|DESTROY|UPDATE)\][ \t]+)?(tcp|udp)[ \t]+\d+[ \t]+(?:(\d+)[ \t]+)?(?:([A-Z_0-9]+)[ \t]+)?"
    r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) (?:packets=\d+ bytes=\d+ )?(?:\[UNREPLIED\] )?"
    r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)(?: packets=\d+ bytes=\d+)?( \[ASSURED\])?(?: mark=(\d+))?([^\n]*)$",
    re.M,
)
# The same for ICMP: type/code/id instead of ports.
_ICMP = re.compile(
    r"^[ \t]*(?:\[(NEW|DESTROY|UPDATE)\][ \t]+)?icmp[ \t]+\d+[ \t]+(?:(\d+)[ \t]+)?"
    r"src=(\S+) dst=(\S+) type=(\d+) code=(\d+) id=(\d+) (?:packets=\d+ bytes=\d+ )?(?:\[UNREPLIED\] )?"
    r"src=(\S+) dst=(\S+) type=\d+ code=\d+ id=(\d+)(?: packets=\d+ bytes=\d+)?( \[ASSURED\])?(?: mark=(\d+))?([^\n]*)$",
    re.M,
)
_MARK = re.compile(r"\bmark=(\d+)")


def _session_pattern(fields: bool) -> re.Pattern[bytes]:
    """One TCP/UDP line of ``conntrack -L`` that is a translated session, over bytes.

    The test :func:`_port_session` makes per line is made by the pattern
    itself, so that ``findall`` (a C loop) returns sessions only: the reply
    tuple comes from the original destination (back-references), is
    addressed to something other than the original source (a negative
    look-ahead), and TCP carries one of the module's states (the
    conditional on the ``tcp`` group).  A line that fails is not a session
    and is counted as untranslated; the line forms are those of
    :data:`_PORTS`.  ``fields`` captures everything a NatSession needs;
    without it only what the digest hashes (protocol and the two tuples'
    five fields) is captured, which is cheaper for ``findall``.
    """
    cap = (lambda g: f"({g})") if fields else (lambda g: f"(?:{g})")
    states = "|".join(sorted(TCP_STATES, key=len, reverse=True))
    head = (
        r"^[ \t]*(?:\[(?:NEW|DESTROY|UPDATE)\][ \t]+)?(?:(?P<tcp>tcp)|udp)[ \t]+\d+[ \t]+(?:" + cap(r"\d+") + r"[ \t]+)?"
        r"(?(tcp)" + cap(states) + r"[ \t]+|(?:[A-Z_0-9]+[ \t]+)?)"
        r"src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) dport=(?P<dport>\d+) (?:packets=\d+ bytes=\d+ )?(?:\[UNREPLIED\] )?"
        r"src=(?P=dst) dst=(?!(?P=src) sport=\d+ dport=(?P=sport)(?!\d))(\S+) sport=(?P=dport) dport=(\d+)"
    )
    # With a mark where conntrack puts it, the rest of the line is not
    # captured (findall then hands back the shared empty bytes object).
    tail = r"(?: packets=\d+ bytes=\d+)?( \[ASSURED\])?(?: mark=(\d+)[^\n]*|([^\n]*))$" if fields else r"[^\n]*$"
    return re.compile((head + tail).encode(), re.M)


_SESSIONS = _session_pattern(fields=True)
_DIGESTED = _session_pattern(fields=False)

ICMP_ECHO_REQUEST = 8


@dataclass(frozen=True)
class Table:
    """What a conntrack text dump held: translated sessions and the count of everything else."""

    sessions: list[NatSession]
    untranslated: int


@dataclass(frozen=True)
class Event:
    """One line of ``conntrack -E``: ``kind`` is "new" or "destroy"."""

    kind: str
    session: NatSession


def _tail(assured: str | None, mark: str | None, rest: str) -> tuple[bool, int]:
    """(assured, mark) of a line; ``rest`` is searched only when the usual order did not hold."""
    if mark is None and "mark=" in rest:
        m = _MARK.search(rest)
        mark = m.group(1) if m else None
    return (assured is not None or "[ASSURED]" in rest, int(mark) if mark else 0)


def _port_session(m: re.Match, lenient: bool = False) -> NatSession | None:
    """The session of a TCP/UDP line, or None when it is not source-translated.

    ``lenient`` (events) keeps a TCP line without a known state, with
    tcp_state None: an event about a session is worth more than its state.
    """
    _ev, proto, timeout, state, src, dst, sport, dport, rsrc, rdst, rsport, rdport, assured, mark, rest = m.groups()
    # Source NAT shows as a reply tuple addressed to something other than the
    # original source; a destination-NATed flow (reply from elsewhere) is not
    # a session of this NAT.
    if (rdst == src and rdport == sport) or rsrc != dst or rsport != dport:
        return None
    tcp = proto == "tcp"
    tcp_state = TCP_STATES.get(state or "") if tcp else None
    if tcp and tcp_state is None and not lenient:
        return None
    a, mk = _tail(assured, mark, rest)
    return NatSession(
        "TCP" if tcp else "UDP", src, int(sport), dst, int(dport), rdst, int(rdport),
        tcp_state, max(1, int(timeout)) if timeout is not None else None, a, mk,
    )


def _icmp_session(m: re.Match) -> NatSession | None:
    """The session of an ICMP echo line, or None when it is not source-translated."""
    _ev, timeout, src, dst, itype, _code, ident, rsrc, rdst, rident, assured, mark, rest = m.groups()
    if int(itype) != ICMP_ECHO_REQUEST or rsrc != dst or (rdst == src and rident == ident):
        return None
    a, mk = _tail(assured, mark, rest)
    return NatSession(
        "ICMP", src, int(ident), dst, 0, rdst, int(rident),
        None, max(1, int(timeout)) if timeout is not None else None, a, mk,
    )


@dataclass(frozen=True)
class TableSummary:
    """What :func:`summarize_table` counts: sessions, other lines, and the digest accumulator.

    ``digest`` is :func:`natmig.model.digest_xor` of the sessions' texts
    (spell it with :func:`natmig.model.format_digest`); summaries of parts of
    a dump add up with :meth:`plus`.
    """

    sessions: int
    untranslated: int
    digest: int

    def plus(self, other: "TableSummary") -> "TableSummary":
        """The summary of both parts together."""
        return TableSummary(self.sessions + other.sessions, self.untranslated + other.untranslated, self.digest ^ other.digest)


class _Memo(dict):
    """A dict that fills itself: ``memo[text]`` converts ``text`` once and then looks it up.

    A table repeats most of its texts (addresses, states, timeouts, marks):
    one dict lookup in C replaces a conversion and an object per field.
    """

    def __init__(self, convert: Callable[[bytes], object]) -> None:
        super().__init__()
        self.convert = convert

    def __missing__(self, key: bytes) -> object:
        value = self[key] = self.convert(key)
        return value


class _KeptMemo(_Memo):
    """A :class:`_Memo` kept across chunks, which stops growing at ``limit`` texts (then converts each new one every time)."""

    def __init__(self, convert: Callable[[bytes], object], limit: int) -> None:
        super().__init__(convert)
        self.limit = limit

    def __missing__(self, key: bytes) -> object:
        value = self.convert(key)
        if len(self) < self.limit:
            self[key] = value
        return value


_PROTOCOL = {b"tcp": "TCP", b"": "UDP"}
_PROTOCOL_TEXT = {b"tcp": b"TCP", b"": b"UDP"}
_STATE = {b"": None, **{k.encode(): v for k, v in TCP_STATES.items()}}
_ASSURED = {b"": False, b" [ASSURED]": True}


def _timeout(text: bytes) -> int | None:
    # Absent in some lines; zero (about to expire) is below the module's minimum of 1.
    return max(1, int(text)) if text else None


def _line_count(data: bytes | str) -> int:
    if isinstance(data, str):
        return data.count("\n") + (1 if data and not data.endswith("\n") else 0)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _icmp_sessions(data: bytes) -> list[NatSession]:
    """The ICMP echo sessions of a dump, in its order.

    ICMP lines are few; they are found with ``bytes.find`` (a C scan) and
    only they are decoded and matched: running :data:`_ICMP` over the whole
    dump costs as much as the TCP/UDP pass itself.
    """
    out: list[NatSession] = []
    at = data.find(b"icmp")
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        if end < 0:
            end = len(data)
        m = _ICMP.match(data[start:end].decode())
        if m is not None and (s := _icmp_session(m)) is not None:
            out.append(s)
        at = data.find(b"icmp", end)
    return out


def _parse_sessions(data: bytes) -> Table:
    """:func:`parse_table` without ``taken``: one ``findall`` in C, then columns of repeated texts.

    Every field of a row is converted through a :class:`_Memo` or a C
    conversion mapped over a whole column, and the records are made by
    ``map(NatSession, ...)``: no Python-level loop over the lines.
    """
    rows = _SESSIONS.findall(data)
    sessions: list[NatSession] = []
    if rows:
        tcp, timeout, state, src, dst, sport, dport, rdst, rdport, assured, mark, rest = zip(*rows)
        address = _Memo(bytes.decode).__getitem__
        port = _Memo(int).__getitem__
        marks = list(map(_Memo(lambda t: int(t) if t else None).__getitem__, mark))
        assureds = list(map(_ASSURED.__getitem__, assured))
        if None in marks:
            # The mark was not where conntrack usually prints it: search the rest of those lines.
            for i, m in enumerate(marks):
                if m is None:
                    assureds[i], marks[i] = _tail(assured[i] or None, None, rest[i].decode())
        sessions = list(map(
            NatSession, map(_PROTOCOL.__getitem__, tcp), map(bytes.decode, src), map(port, sport),
            map(address, dst), map(port, dport), map(address, rdst), map(port, rdport),
            map(_STATE.__getitem__, state), map(_Memo(_timeout).__getitem__, timeout), assureds, marks,
        ))
    sessions += _icmp_sessions(data)
    return Table(sessions, _line_count(data) - len(sessions))


#: The optional leaves :func:`entries_xml` writes from a line's columns, with
#: the value each column's text stands for (as :func:`_parse_sessions` reads it).
_OPTIONAL_VALUES: dict[str, Callable[[bytes], object]] = {
    "tcp_state": _STATE.__getitem__, "timeout": _timeout, "assured": _ASSURED.__getitem__, "mark": int,
}


def _leaf_xml(codec: "Codec", leaf: str) -> Callable[[bytes], bytes]:
    """An optional leaf's XML, as the codec writes it, for the text of its column."""
    value = _OPTIONAL_VALUES[leaf]
    return lambda text: codec.optional_leaf_xml(leaf, value(text)).encode()


#: Column texts each of :func:`entries_xml`'s memos keeps at most (every port number).
_KEPT = 1 << 16


class _EntryWriter:
    """What :func:`entries_xml` needs of one codec: the text between the columns, and each optional leaf's XML per column text."""

    def __init__(self, codec: "Codec") -> None:
        ns, name = codec.ns, codec.schema.list_name
        self.glue = [
            f'<{name} xmlns="{ns}"><protocol>'.encode(), b"</protocol><src_address>", b"</src_address><src_port>",
            b"</src_port><dst_address>", b"</dst_address><dst_port>", b"</dst_port><translated_address>",
            b"</translated_address><translated_port>", b"</translated_port>",
        ]
        self.tail = f"</{name}>".encode()
        self.optional = codec.optional_leaves
        # Kept for the agent's life, each at most _KEPT texts (every port; a
        # table's timeouts are many, ~100 bytes each): a memo per chunk would
        # convert most of a chunk's timeouts anew.
        self.leaf = {leaf: _KeptMemo(_leaf_xml(codec, leaf), _KEPT) for leaf in self.optional if leaf in _OPTIONAL_VALUES}
        self.port = _KeptMemo(_port_text, _KEPT)

    @property
    def usable(self) -> bool:
        """Whether the codec's entry is the one written here (every optional leaf one of a conntrack line's columns)."""
        return len(self.leaf) == len(self.optional)


def _port_text(text: bytes) -> bytes:
    # A column text that is no canonical decimal (leading zeros) is normalised as int() then str() would.
    return b"%d" % int(text)


_WRITERS: dict[int, tuple["Codec", _EntryWriter]] = {}


def _writer(codec: "Codec") -> _EntryWriter:
    # One per codec (an agent has one).
    held = _WRITERS.get(id(codec))
    if held is None or held[0] is not codec:
        held = _WRITERS[id(codec)] = (codec, _EntryWriter(codec))
    return held[1]


def entries_xml(data: bytes, codec: "Codec") -> bytes:
    """``codec.encode_xml(parse_table(data).sessions, root=None)``, written straight from the text.

    A streamed get-config of 100k sessions spent ~0.9 s of the source
    agent's CPU building NatSession records and writing each one's XML
    from them; here the columns that :func:`_parse_sessions` reads are
    joined with the XML between them by C loops (``zip``, ``chain``,
    ``bytes.join``), each column's text mapped once through a memo.  The
    bytes are the same as the general path's (a differential test holds
    them equal); text that needs more than the columns -- a mark not where
    conntrack prints it, anything not ASCII -- takes the general path.
    """
    w = _writer(codec)
    rows = _SESSIONS.findall(data) if w.usable and data.isascii() else None
    if not rows:
        return codec.encode_xml(parse_table(data).sessions, root=None)
    tcp, timeout, state, src, dst, sport, dport, rdst, rdport, assured, mark, _rest = zip(*rows)
    if b"" in mark:
        return codec.encode_xml(parse_table(data).sessions, root=None)
    icmp = codec.encode_xml(_icmp_sessions(data), root=None)
    port = w.port.__getitem__
    columns = {"tcp_state": state, "timeout": timeout, "assured": assured, "mark": mark}
    g = w.glue
    parts = zip(
        repeat(g[0]), map(_PROTOCOL_TEXT.__getitem__, tcp), repeat(g[1]), src, repeat(g[2]), map(port, sport),
        repeat(g[3]), dst, repeat(g[4]), map(port, dport), repeat(g[5]), rdst, repeat(g[6]), map(port, rdport), repeat(g[7]),
        *(map(w.leaf[leaf].__getitem__, columns[leaf]) for leaf in w.optional), repeat(w.tail),
    )
    return b"".join(chain.from_iterable(parts)) + icmp


def summarize_table(data: bytes) -> TableSummary:
    """Count and digest the translated sessions of ``conntrack -L`` output without building them.

    The same lines are sessions as for :func:`parse_table`, and the digest
    is :func:`natmig.model.table_digest` of them: each session's text is
    joined from the captured fields as conntrack printed them (plain
    decimals, as ``str()`` of the NatSession's int prints them).
    """
    rows = _DIGESTED.findall(data)
    acc = 0
    if rows:
        tcp, src, dst, sport, dport, rdst, rdport = zip(*rows)
        acc = digest_xor(map(b" ".join, zip(map(_PROTOCOL_TEXT.__getitem__, tcp), src, sport, dst, dport, rdst, rdport)))
    icmp = _icmp_sessions(data)
    if icmp:
        acc ^= digest_xor(
            f"ICMP {s.src_address} {s.src_port} {s.dst_address} {s.dst_port} {s.translated_address} {s.translated_port}".encode()
            for s in icmp
        )
    n = len(rows) + len(icmp)
    return TableSummary(n, _line_count(data) - n, acc)


def _hold(taken: dict[ReplyKey, EntryTuple], p: str, src: str, dst: str, sport: str, dport: str,
          rsrc: str, rdst: str, rsport: str, rdport: str) -> None:
    """Record both tuples of an entry that is not a session, each in the form of a session's reply key.

    The kernel refuses (or, unpinned, re-maps) a new session whose reply
    tuple equals either tuple of any entry; sessions only check each other's
    reply keys, so the tuples of everything else are collected here.
    """
    holder = (p, src, int(sport), dst, int(dport))
    taken[(p, dst, int(dport), src, int(sport))] = holder
    taken[(p, rdst, int(rdport), rsrc, int(rsport))] = holder


def parse_table(text: str | bytes, taken: dict[ReplyKey, EntryTuple] | None = None) -> Table:
    """Parse ``conntrack -L`` output: translated sessions, and how many lines were not.

    Lines of other protocols, un-translated or destination-translated flows,
    ICMP other than echo, and TCP in state NONE are counted, not returned.
    With ``taken``, the TCP/UDP/ICMP-echo lines left out also record there
    the reply keys their tuples hold (by the holder's original tuple), for
    apply's check.  Without it (list), the bytes as conntrack wrote them
    go through :func:`_parse_sessions`, which makes the same records some
    times faster; the line-by-line reading below stays for ``taken``.
    """
    if taken is None:
        return _parse_sessions(text.encode() if isinstance(text, str) else text)
    if isinstance(text, bytes):
        text = text.decode()
    return _parse_lines(text, taken)


def _parse_lines(text: str, taken: dict[ReplyKey, EntryTuple] | None = None) -> Table:
    """:func:`parse_table` line by line, recording in ``taken`` (when given) what is not a session."""
    sessions: list[NatSession] = []
    append = sessions.append
    new = NatSession
    states = TCP_STATES
    # The TCP/UDP loop is the hot path of list(): _port_session inlined.
    for m in _PORTS.finditer(text):
        _ev, proto, timeout, state, src, dst, sport, dport, rsrc, rdst, rsport, rdport, assured, mark, rest = m.groups()
        if (rdst == src and rdport == sport) or rsrc != dst or rsport != dport:
            if taken is not None:
                _hold(taken, proto.upper(), src, dst, sport, dport, rsrc, rdst, rsport, rdport)
            continue
        if proto == "tcp":
            p = "TCP"
            tcp_state = states.get(state)
            if tcp_state is None:
                if taken is not None:
                    _hold(taken, p, src, dst, sport, dport, rsrc, rdst, rsport, rdport)
                continue
        else:
            p, tcp_state = "UDP", None
        if mark is None:
            a, mk = _tail(assured, mark, rest)
        else:
            a, mk = assured is not None, int(mark)
        t = int(timeout) if timeout is not None else None
        append(new(p, src, int(sport), dst, int(dport), rdst, int(rdport), tcp_state, t if t != 0 else 1, a, mk))
    for m in _ICMP.finditer(text):
        s = _icmp_session(m)
        if s is not None:
            append(s)
        elif taken is not None and int(m.group(5)) == ICMP_ECHO_REQUEST:
            # Only the echo reply direction can equal a session's reply tuple (type 0).
            _ev, _t, src, dst, _ty, _c, ident, rsrc, rdst, rident = m.groups()[:10]
            taken[("ICMP", rdst, int(rident), rsrc, 0)] = ("ICMP", src, int(ident), dst, 0)
    return Table(sessions, _line_count(text) - len(sessions))


_EVENT_KINDS = {"NEW": "new", "DESTROY": "destroy"}


def parse_event(line: str) -> Event | None:
    """The event of one ``conntrack -E`` line, or None (not a translated session, or not new/destroy)."""
    for pat, build in ((_PORTS, lambda m: _port_session(m, lenient=True)), (_ICMP, _icmp_session)):
        m = pat.match(line.rstrip("\n"))
        if m is not None:
            kind = _EVENT_KINDS.get(m.group(1) or "")
            s = build(m)
            return Event(kind, s) if kind and s is not None else None
    return None


def seen_reply(s: NatSession) -> bool:
    """Whether to recreate a session as answered.

    The module has no leaf for it: a TCP session past the handshake has been
    answered; an assured one has too; other UDP and ICMP sessions are
    recreated as answered as well, since a session worth moving is one that
    had traffic both ways, and the kernel only ever sets the bit, never clears it.
    """
    if s.protocol == "TCP":
        return s.assured or (s.tcp_state or "ESTABLISHED") not in ("SYN_SENT", "SYN_SENT2")
    return True
