"""The live digest without root: ctnetlink messages read as cttext reads lines, the table's algebra, the follower's logic.

* Entries of every kind (IPv4/IPv6, TCP/UDP/ICMP/SCTP/ICMPv6, translated or
  not, TCP in any state, zones) written both as the kernel writes them over
  ctnetlink and as ``conntrack -L`` prints them: :func:`ctevents.parse`
  counts and digests them as :func:`cttext.summarize_table` does, and its
  fast pattern gives what the general attribute walk gives.
* :class:`DigestTable` against ``model.table_digest`` of the final table, for
  random histories read the way a subscribe-then-dump race reads them.
* :class:`LiveDigest` over a fake kernel: other writers, the agent's own
  writes (whose events the kernel drops) with others writing meanwhile,
  entries a GET must re-read, lost events -- its answer is always the table's.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natmig.agent import ctdeadlines, ctdigest, ctdigesttable, ctevents as ev, cttext
from natmig.agent import ctnetlink as nl
from natmig.agent.ctdigest import LiveDigest
from natmig.agent.ctdigesttable import DigestTable
from natmig.model import NatSession, digest_values, format_digest, key_range, range_digests, session_text, table_digest

from .strategies import tables

# -- entries, written both ways -------------------------------------------------

_V4 = ["10.0.0.2", "10.0.0.21", "198.51.100.7", "203.0.113.1"]
_V6 = ["2001:db8::1", "2001:db8::a:2", "fd00::7"]
_TCP_NAMES = ["NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"]
_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "icmpv6": 58}


@dataclass(frozen=True)
class Entry:
    """One conntrack entry: its two tuples and what else decides how it counts."""

    family: int
    proto: str
    src: str
    dst: str
    sport: int  # ICMP: the identifier
    dport: int  # ICMP: the type (code 0)
    rsrc: str
    rdst: str
    rsport: int
    rdport: int  # ICMP: the reply's type
    state: int  # TCP state number
    zone: int

    def line(self) -> str:
        """The entry as ``conntrack -L`` prints it."""
        num = _NUM[self.proto]
        state = f" {_TCP_NAMES[self.state]}" if self.proto == "tcp" else (" ESTABLISHED" if self.proto == "sctp" else "")
        if self.proto in ("icmp", "icmpv6"):
            body = (f"src={self.src} dst={self.dst} type={self.dport} code=0 id={self.sport} "
                    f"src={self.rsrc} dst={self.rdst} type={self.rdport} code=0 id={self.rsport}")
        else:
            body = (f"src={self.src} dst={self.dst} sport={self.sport} dport={self.dport} "
                    f"src={self.rsrc} dst={self.rdst} sport={self.rsport} dport={self.rdport}")
        zone = f" zone={self.zone}" if self.zone else ""
        return f"{self.proto:<8} {num} 299{state} {body} mark=0{zone} use=1\n"

    def message(self, kind: int = ev.NEW, layout: int = 0, pid: int = 0) -> bytes:
        """The entry as the kernel sends it (an event, or a dump's answer); ``layout`` varies what comes between tuples and state."""
        attrs = self._tuple(nl.CTA_TUPLE_ORIG, self.src, self.dst, self.sport, self.dport)
        attrs += self._tuple(nl.CTA_TUPLE_REPLY, self.rsrc, self.rdst, self.rsport, self.rdport)
        if self.zone:
            attrs += nl._attr(ev.CTA_ZONE, struct.pack("!H", self.zone))
        counters = nl._nest(9, nl._attr(1, struct.pack("!Q", 3)), nl._attr(2, struct.pack("!Q", 99)))
        head = [nl._attr(12, b"\0\0\0\1"), nl._attr(nl.CTA_STATUS, b"\0\0\1\x9a"), nl._attr(nl.CTA_TIMEOUT, b"\0\0\1\x2b")]
        if layout == 1:
            head.reverse()
        elif layout == 2:
            head.insert(1, counters)  # what the pattern for the state does not expect: the walk finds it
        attrs += b"".join(head)
        if self.proto == "tcp" and kind == ev.NEW:
            attrs += nl._nest(nl.CTA_PROTOINFO, nl._nest(nl.CTA_PROTOINFO_TCP, nl._attr(nl.CTA_PROTOINFO_TCP_STATE, bytes([self.state])),
                                                         nl._attr(2, b"\7"), nl._attr(3, b"\7")))
        attrs += nl._attr(nl.CTA_MARK, b"\0\0\0\0")
        typ = (nl.NFNL_SUBSYS_CTNETLINK << 8) | (nl.IPCTNL_MSG_CT_NEW if kind == ev.NEW else nl.IPCTNL_MSG_CT_DELETE)
        body = struct.pack("=BBH", self.family, 0, 0) + attrs
        return struct.pack("=IHHII", 16 + len(body), typ, 0x600, 0, pid) + body

    def _tuple(self, kind: int, src: str, dst: str, a: int, b: int) -> bytes:
        if self.family == socket.AF_INET:
            ip = nl._nest(nl.CTA_TUPLE_IP, nl._attr(1, socket.inet_aton(src)), nl._attr(2, socket.inet_aton(dst)))
        else:
            ip = nl._nest(nl.CTA_TUPLE_IP, nl._attr(3, socket.inet_pton(socket.AF_INET6, src)),
                          nl._attr(4, socket.inet_pton(socket.AF_INET6, dst)))
        num = _NUM[self.proto]
        if self.proto == "icmp":
            l4 = nl._attr(4, struct.pack("!H", a)) + nl._attr(5, bytes([b])) + nl._attr(6, b"\0")
        elif self.proto == "icmpv6":
            l4 = nl._attr(7, struct.pack("!H", a)) + nl._attr(8, bytes([b])) + nl._attr(9, b"\0")
        else:
            l4 = nl._attr(2, struct.pack("!H", a)) + nl._attr(3, struct.pack("!H", b))
        return nl._nest(kind, ip, nl._nest(nl.CTA_TUPLE_PROTO, nl._attr(1, bytes([num])), l4))


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    """Entries of every kind, translated or not: the forms the text rules tell apart."""
    six = draw(st.integers(0, 5)) == 0
    family, addrs = (socket.AF_INET6, _V6) if six else (socket.AF_INET, _V4)
    proto = draw(st.sampled_from(["icmpv6", "tcp", "udp"] if six else ["tcp", "tcp", "udp", "udp", "icmp", "sctp"]))
    src, dst, rdst = (draw(st.sampled_from(addrs)) for _ in range(3))
    rsrc = draw(st.sampled_from([dst, dst, dst, draw(st.sampled_from(addrs))]))  # sometimes destination-NATed
    zone = draw(st.sampled_from([0, 0, 0, 3]))
    state = draw(st.integers(0, 9))
    if proto in ("icmp", "icmpv6"):
        itype = draw(st.sampled_from([8, 8, 13]) if proto == "icmp" else st.sampled_from([128, 128, 1]))
        ident = draw(st.sampled_from([5, 6]))
        rident = draw(st.sampled_from([ident, 20009, 20010]))
        reply = {8: 0, 13: 14, 128: 129, 1: 1}[itype]
        return Entry(family, proto, src, dst, ident, itype, rsrc, rdst, rident, reply, state, zone)
    sport, dport = draw(st.sampled_from([1, 9, 53, 80, 20001])), draw(st.sampled_from([1, 9, 53, 80]))
    rsport = draw(st.sampled_from([dport, dport, dport, 81]))
    rdport = draw(st.sampled_from([sport, 20001, 20002, 9]))  # sometimes not translated at all
    return Entry(family, proto, src, dst, sport, dport, rsrc, rdst, rsport, rdport, state, zone)


def _identity(e: Entry) -> tuple:
    """What makes two entries distinct to the kernel: family, protocol, zone and the original tuple."""
    return (e.family, e.proto, e.zone, e.src, e.dst, e.sport, e.dport)


tables_of_entries = st.lists(entries(), max_size=30, unique_by=_identity)


def _summary(records: list) -> tuple[int, int, str]:
    t = DigestTable()
    t.apply(records)
    s = t.summary()
    return s.sessions, s.untranslated, format_digest(s.digest)


@given(tables_of_entries, st.integers(0, 2))
@settings(max_examples=400, deadline=None)
def test_messages_count_and_digest_as_the_text_of_the_same_entries(table: list[Entry], layout: int) -> None:
    buf = b"".join(e.message(layout=layout) for e in table)
    records: list = []
    ev.parse(buf, records)
    text = cttext.summarize_table("".join(e.line() for e in table).encode())
    assert _summary(records) == (text.sessions, text.untranslated, format_digest(text.digest))
    assert len({r[1] for r in records}) == len(table)  # distinct entries, distinct identities


@given(entries(), st.integers(0, 2), st.sampled_from([ev.NEW, ev.DESTROY]))
@settings(max_examples=400, deadline=None)
def test_the_fast_pattern_reads_what_the_attribute_walk_reads(e: Entry, layout: int, kind: int) -> None:
    msg = e.message(kind, layout)
    fast: list = []
    ev.parse(msg, fast)
    assert fast == [ev._general(msg, 0, len(msg), kind)]
    # A NEW and a DESTROY of one entry name it alike.
    other: list = []
    ev.parse(e.message(ev.DESTROY if kind == ev.NEW else ev.NEW, layout), other)
    assert other[0][1] == fast[0][1]


def test_a_tcp_entry_counted_untranslated_only_for_its_state_is_marked_to_be_read_again() -> None:
    base = Entry(socket.AF_INET, "tcp", "10.0.0.2", "198.51.100.7", 40000, 80, "198.51.100.7", "203.0.113.1", 80, 20001, 3, 0)
    for state, want in ((3, bytes), (9, bytes), (0, ev._Unsure)):
        records: list = []
        ev.parse(Entry(**{**base.__dict__, "state": state}).message(), records)
        assert type(records[0][2]) is want
    # Without protoinfo (an event that does not tell the state) too.
    records = []
    msg = base.message()
    cut = msg.index(struct.pack("=H", nl.CTA_PROTOINFO | nl.NLA_F_NESTED)) - 2
    ln = struct.unpack_from("=H", msg, cut)[0]
    stripped = msg[:cut] + msg[cut + ln:]
    ev.parse(struct.pack("=I", len(stripped)) + stripped[4:], records)
    assert records[0][2] is ev.UNSURE


def test_messages_of_the_own_port_id_are_skipped() -> None:
    e = Entry(socket.AF_INET, "udp", "10.0.0.2", "198.51.100.7", 1, 53, "198.51.100.7", "203.0.113.1", 53, 20001, 0, 0)
    records: list = []
    ev.parse(e.message(pid=77) + e.message(pid=78), records, own=77)
    assert len(records) == 1


def test_the_own_port_filter_program_compares_the_port_id_field() -> None:
    prog, fprog = ev.own_filter(0x01020304)
    insns = [struct.unpack_from("=HBBI", prog.raw, i * 8) for i in range(4)]
    assert insns[0] == (0x20, 0, 0, 12)  # ld [12]: nlmsg_pid, read big-endian
    assert insns[1][3] == struct.unpack(">I", struct.pack("=I", 0x01020304))[0]
    assert struct.unpack("HL", fprog)[0] == 4


@given(st.lists(st.builds(NatSession, protocol=st.sampled_from(["TCP", "UDP", "ICMP"]), src_address=st.sampled_from(_V4),
                          src_port=st.sampled_from([1, 7, 53]), dst_address=st.sampled_from(_V4),
                          dst_port=st.sampled_from([0, 53, 80]), translated_address=st.sampled_from(_V4),
                          translated_port=st.sampled_from([1, 7, 20001]), tcp_state=st.just("ESTABLISHED")),
                max_size=10, unique_by=lambda s: s.key))
@settings(max_examples=200, deadline=None)
def test_a_confirmed_create_counts_as_the_event_of_the_entry_the_kernel_makes(sessions: list[NatSession]) -> None:
    sessions = [s if s.protocol != "ICMP" else NatSession(s.protocol, s.src_address, s.src_port, s.dst_address, 0,
                                                           s.translated_address, s.translated_port) for s in sessions]
    sessions = list({s.key: s for s in sessions}.values())
    fed = DigestTable()
    fed.created(sessions)
    # The entry create_attrs makes: reply from the destination to the translated endpoint.
    records: list = []
    for s in sessions:
        if s.protocol == "ICMP":
            e = Entry(socket.AF_INET, "icmp", s.src_address, s.dst_address, s.src_port, 8, s.dst_address, s.translated_address,
                      s.translated_port, 0, 0, 0)
        else:
            e = Entry(socket.AF_INET, s.protocol.lower(), s.src_address, s.dst_address, s.src_port, s.dst_port, s.dst_address,
                      s.translated_address, s.dst_port, s.translated_port, 3, 0)
        ev.parse(e.message(), records)
    evented = DigestTable()
    evented.apply(records)
    assert fed.held == evented.held and fed.summary() == evented.summary()
    assert fed.ranges() == evented.ranges()  # each key's range too (created computes it from the key's text once)


# -- the table's algebra against table_digest, read the way the race reads it ---

def _value(s: NatSession) -> int:
    return digest_values([session_text(s)])[0]


@st.composite
def histories(draw: st.DrawFn) -> tuple[dict, list, int, list[int], list[int]]:
    """A table, changes to it as the kernel allows them, when the subscription starts, when the dump reads each key, the dump's order.

    Keys are sessions' keys; a value is a session (translated) or None (untranslated).
    """
    pool = draw(tables)
    keys = [s.key for s in pool]
    table = {s.key: (s if draw(st.booleans()) else None) for s in pool if draw(st.booleans())}
    changes: list[tuple] = []
    state = dict(table)
    for _ in range(draw(st.integers(0, 25))):
        if not keys:
            break
        k = draw(st.sampled_from(keys))
        if k in state:
            changes.append(("destroy", k))
            del state[k]
        else:
            alt = draw(st.sampled_from(pool))
            v = None if draw(st.integers(0, 3)) == 0 else NatSession(*k, alt.translated_address, alt.translated_port)
            changes.append(("new", k, v))
            state[k] = v
    subscribed = draw(st.integers(0, len(changes)))
    read_at = [draw(st.integers(subscribed, len(changes))) for _ in keys]
    order = draw(st.permutations(list(range(len(keys)))))
    return table, changes, subscribed, read_at, order


@given(histories())
@settings(max_examples=500, deadline=None)
def test_a_dump_read_during_changes_and_the_events_after_subscribing_give_the_final_table(h) -> None:
    table, changes, subscribed, read_at, order = h
    keys = sorted({k for k in table} | {c[1] for c in changes})
    states = [dict(table)]
    for c in changes:
        nxt = dict(states[-1])
        if c[0] == "destroy":
            del nxt[c[1]]
        else:
            nxt[c[1]] = c[2]
        states.append(nxt)

    def record(kind: int, k: tuple, v: NatSession | None) -> tuple:
        return (kind, k, None if v is None or kind == ev.DESTROY else session_text(v))

    # The dump reads each key at its own moment after subscribing (a bucket at a time), in any order.
    dump = []
    for i in order:
        if i < len(keys):
            k = keys[i]
            at = states[read_at[i] if i < len(read_at) else subscribed]
            if k in at:
                dump.append(record(ev.NEW, k, at[k]))
    events = [record(ev.DESTROY, c[1], None) if c[0] == "destroy" else record(ev.NEW, c[1], c[2]) for c in changes[subscribed:]]
    t = DigestTable()
    t.apply(dump)
    t.apply(events)
    final = states[-1]
    sessions = [v for v in final.values() if v is not None]
    assert format_digest(t.acc) == table_digest(sessions)
    assert t.summary().sessions == len(sessions) and t.untranslated == len(final) - len(sessions)
    assert set(t.held) == set(final)
    assert t.ranges() == range_digests(sessions)  # the key ranges too, through the same race


def test_put_and_drop_keep_counts_and_xor() -> None:
    a = NatSession("TCP", "10.0.0.2", 1, "198.51.100.7", 80, "203.0.113.1", 20000)
    b = NatSession("TCP", "10.0.0.2", 1, "198.51.100.7", 80, "203.0.113.1", 20001)
    t = DigestTable()
    t.put(a.key, _value(a))
    t.put(a.key, _value(a))  # again, the same: nothing
    assert t.summary() == ctdigesttable.Summary(1, 0, _value(a))
    t.put(a.key, _value(b))  # re-mapped: replaced
    assert t.acc == _value(b)
    t.put(a.key, None, unsure=True)
    assert t.summary() == ctdigesttable.Summary(0, 1, 0) and t.unsure == {a.key}
    t.put(a.key, None)
    assert t.unsure == set()
    assert t.drop(a.key) and not t.drop(a.key)
    assert t.summary() == ctdigesttable.Summary(0, 0, 0)


# -- the follower over a fake kernel ----------------------------------------------

OWN = 4242


class FakeKernel:
    """A conntrack table with event subscribers: what LiveDigest needs of the kernel, in memory."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.state: dict[tuple, object] = {}  # key -> text (bytes, None or UNSURE)
        self.sockets: list[FakeEvents] = []
        self.capacity = capacity
        self.dumps = 0
        self.during_dump: list[tuple] = []  # (position, change): changes made while a dump reads the table

    def change(self, kind: str, key: tuple, text: object = None, by: int = 0) -> None:
        if kind == "new":
            self.state[key] = text
            rec = (ev.NEW, key, text)
        else:
            self.state.pop(key, None)
            rec = (ev.DESTROY, key, None)
        for s in self.sockets:
            if by != s.own:
                s.queue(rec)

    def dump(self, records: list) -> None:
        self.dumps += 1
        pending = sorted(self.during_dump, key=lambda x: x[0])
        self.during_dump = []
        for i, k in enumerate(sorted(self.state, key=repr)):
            while pending and pending[0][0] <= i:
                self.change(*pending.pop(0)[1])
            if k in self.state:
                records.append((ev.NEW, k, self.state[k]))
        for _, c in pending:
            self.change(*c)

    def summary(self) -> ctdigesttable.Summary:
        texts = [t for t in self.state.values() if type(t) is bytes]
        acc = 0
        for v in digest_values(texts):
            acc ^= v
        return ctdigesttable.Summary(len(texts), len(self.state) - len(texts), acc)


class FakeEvents:
    def __init__(self, kernel: FakeKernel, own: int | None) -> None:
        self.kernel, self.own = kernel, own
        self.q: list = []
        self.overflowed = False
        kernel.sockets.append(self)

    def queue(self, rec: tuple) -> None:
        if len(self.q) >= self.kernel.capacity:
            self.overflowed = True
        else:
            self.q.append(rec)

    def read(self, records: list, limit: int | None = None, timeouts: dict | None = None) -> int:
        if self.overflowed:
            self.overflowed = False
            raise ev.EventsLost("lost")
        n = len(self.q) if limit is None else min(limit, len(self.q))
        records.extend(self.q[:n])
        del self.q[:n]
        return n

    def close(self) -> None:
        if self in self.kernel.sockets:
            self.kernel.sockets.remove(self)


class FakeReader:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.gets = 0

    def read(self, keys: list) -> list:
        self.gets += len(keys)
        return [(i, (k, self.kernel.state[k])) for i, k in enumerate(keys) if k in self.kernel.state]


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = FakeKernel()
    monkeypatch.setattr(ev, "EventSocket", lambda netns, own, rcvbuf, drop: FakeEvents(k, own))
    monkeypatch.setattr(ev, "request_socket", lambda netns: object())
    monkeypatch.setattr(ev, "read_table", lambda sock, records, timeouts=None: k.dump(records))
    monkeypatch.setattr(ev, "expire", lambda sock: None)
    monkeypatch.setattr(ev, "entry_record", lambda attrs: attrs)
    monkeypatch.setattr(ev, "entry_timeout", lambda attrs: None)
    monkeypatch.setattr(LiveDigest, "_start_thread", lambda self: None)  # the test reads at each call
    return k


def _key(i: int) -> tuple:
    return ("TCP", "10.0.0.2", 1000 + i, "198.51.100.7", 80)


def _text(i: int, port: int) -> bytes:
    return f"TCP 10.0.0.2 {1000 + i} 198.51.100.7 80 203.0.113.1 {port}".encode()


def _session(i: int, port: int) -> NatSession:
    return NatSession(*_key(i), "203.0.113.1", port, "ESTABLISHED")


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple]:
    """Steps: another writer's change, the agent's own write (others changing things meanwhile), a statistics call, a dump-time change."""
    steps = []
    for _ in range(draw(st.integers(1, 40))):
        what = draw(st.sampled_from(["other", "other", "own", "stats", "during-dump", "unsure"]))
        i, port = draw(st.integers(0, 12)), draw(st.integers(20000, 20004))
        if what == "own":
            others = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(20000, 20004), st.booleans()), max_size=3))
            steps.append(("own", i, port, draw(st.booleans()), others))
        else:
            steps.append((what, i, port, draw(st.booleans()), []))
    return steps


def _other(kernel: FakeKernel, i: int, port: int, create: bool) -> None:
    k = _key(i)
    if create and k not in kernel.state:
        kernel.change("new", k, _text(i, port))
    elif not create and k in kernel.state:
        kernel.change("destroy", k)


@given(scripts())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_follower_answers_the_kernels_table_after_any_mix_of_writers(kernel_factory, steps: list[tuple]) -> None:
    kernel, reader = kernel_factory()
    d = LiveDigest("ns", reader, lambda: OWN)  # type: ignore[arg-type]
    for what, i, port, flag, others in steps:
        if what == "other":
            _other(kernel, i, port, flag)
        elif what == "unsure":
            # A TCP entry in state NONE (untranslated), which packets later move to a known state without an event.
            k = _key(i)
            if k not in kernel.state:
                kernel.change("new", k, ev.UNSURE)
            elif kernel.state[k] is ev.UNSURE:
                kernel.state[k] = _text(i, port)
        elif what == "during-dump":
            kernel.during_dump.append((i, ("new", _key(50 + i), _text(50 + i, port)) if flag else ("destroy", _key(i))))
        elif what == "own":
            with d.writing() as log:
                k = _key(i)
                # Others change things while the agent writes: before and after its own change.
                for j, p, c in others[:1]:
                    _other(kernel, j, p, c)
                if flag and k not in kernel.state:
                    kernel.change("new", k, _text(i, port), by=OWN)
                    log.created([_session(i, port)])
                elif not flag and k in kernel.state and type(kernel.state[k]) is bytes:
                    kernel.change("destroy", k, by=OWN)
                    log.deleted([k])
                for j, p, c in others[1:]:
                    _other(kernel, j, p, c)
        else:
            assert d.statistics() == kernel.summary()
    assert d.statistics() == kernel.summary()
    assert d.ranges() == _kernel_ranges(kernel)  # what get-range-digests answers: the kernel's table cut by key


def _kernel_ranges(kernel: "FakeKernel") -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for k, text in kernel.state.items():
        if type(text) is bytes:
            r = key_range(k[:5])
            n, acc = out.get(r, (0, 0))
            out[r] = (n + 1, acc ^ digest_values([text])[0])
    return out


@pytest.fixture
def kernel_factory(monkeypatch: pytest.MonkeyPatch):
    """A new fake kernel per example (hypothesis runs many in one test)."""
    holder: dict = {}
    monkeypatch.setattr(ev, "EventSocket", lambda netns, own, rcvbuf, drop: FakeEvents(holder["k"], own))
    monkeypatch.setattr(ev, "request_socket", lambda netns: object())
    monkeypatch.setattr(ev, "read_table", lambda sock, records, timeouts=None: holder["k"].dump(records))
    monkeypatch.setattr(ev, "expire", lambda sock: None)
    monkeypatch.setattr(ev, "entry_record", lambda attrs: attrs)
    monkeypatch.setattr(ev, "entry_timeout", lambda attrs: None)
    monkeypatch.setattr(LiveDigest, "_start_thread", lambda self: None)

    def make() -> tuple[FakeKernel, FakeReader]:
        holder["k"] = FakeKernel()
        return holder["k"], FakeReader(holder["k"])
    return make


def test_a_later_call_reads_only_the_changes_and_a_loss_reads_the_table_again(kernel: FakeKernel) -> None:
    reader = FakeReader(kernel)
    for i in range(5):
        kernel.change("new", _key(i), _text(i, 20000 + i))
    d = LiveDigest("ns", reader, lambda: OWN)  # type: ignore[arg-type]
    assert d.statistics() == kernel.summary() and kernel.dumps == 1
    kernel.change("destroy", _key(0))
    kernel.change("new", _key(9), _text(9, 20009))
    assert d.statistics() == kernel.summary() and kernel.dumps == 1
    kernel.capacity = 1
    kernel.change("destroy", _key(1))
    kernel.change("destroy", _key(2))  # past the queue: lost
    assert d.statistics() == kernel.summary() and kernel.dumps == 2  # read whole again, re-subscribed first
    kernel.capacity = 10_000
    kernel.change("destroy", _key(3))
    assert d.statistics() == kernel.summary() and kernel.dumps == 2


def test_own_writes_are_folded_in_without_events_and_a_clash_with_another_writer_is_read_back(kernel: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    reader = FakeReader(kernel)
    d = LiveDigest("ns", reader, lambda: OWN)  # type: ignore[arg-type]
    d.statistics()
    with d.writing() as log:
        for i in range(3):
            kernel.change("new", _key(i), _text(i, 20000 + i), by=OWN)
        log.created([_session(i, 20000 + i) for i in range(3)])
    assert d.statistics() == kernel.summary() and reader.gets == 0
    with d.writing() as log:
        kernel.change("destroy", _key(1), by=OWN)
        log.deleted([_key(1)])
        kernel.change("new", _key(1), _text(1, 20007))  # another writer takes the key at once
    assert d.statistics() == kernel.summary() and reader.gets == 1
    # A delete of a key the digest does not hold: which entry went is not known, so the table is read again.
    with caplog.at_level(logging.WARNING, logger="natmig.agent.ctdigest"):
        with d.writing() as log:
            log.deleted([_key(11)])
    assert not d.valid
    # Said once, with its reason: the next call's full read is what an operator must be able to explain.
    assert [r.getMessage() for r in caplog.records] == [
        "live digest of ns no longer follows the table (a deleted entry was not held): the next call reads it whole"]
    assert d.statistics() == kernel.summary() and kernel.dumps == 2


def test_a_write_that_fails_part_way_makes_the_next_call_read_the_table(kernel: FakeKernel) -> None:
    d = LiveDigest("ns", FakeReader(kernel), lambda: OWN)  # type: ignore[arg-type]
    d.statistics()
    with pytest.raises(RuntimeError):
        with d.writing():
            kernel.change("new", _key(1), _text(1, 20001), by=OWN)
            raise RuntimeError("the socket broke")
    assert not d.valid and d.statistics() == kernel.summary() and kernel.dumps == 2


def test_unsure_entries_are_read_again_at_each_call(kernel: FakeKernel) -> None:
    reader = FakeReader(kernel)
    kernel.change("new", _key(1), ev.UNSURE)
    d = LiveDigest("ns", reader, lambda: OWN)  # type: ignore[arg-type]
    assert d.statistics() == kernel.summary() == ctdigesttable.Summary(0, 1, 0)
    kernel.state[_key(1)] = _text(1, 20001)  # a packet moved it out of NONE: no event says so
    assert d.statistics() == kernel.summary() == ctdigesttable.Summary(1, 0, digest_values([_text(1, 20001)])[0])
    assert reader.gets == 1 and kernel.dumps == 1


# -- deadlines: expired entries found by key, not by walking the table ----------


@given(tables_of_entries, st.integers(0, 2))
@settings(max_examples=200, deadline=None)
def test_a_message_tells_each_new_entry_s_remaining_timeout(table: list[Entry], layout: int) -> None:
    # The pattern after the tuples (layouts 0 and 1) and the walk (2: counters first) agree.
    timeouts: dict = {}
    records: list = []
    ev.parse(b"".join(e.message(layout=layout) for e in table), records, timeouts=timeouts)
    assert {ident for kind, ident, _ in records} == set(timeouts) and set(timeouts.values()) <= {299}
    gone: dict = {}
    ev.parse(b"".join(e.message(kind=ev.DESTROY, layout=layout) for e in table), [], timeouts=gone)
    assert gone == {}  # a DESTROY tells no timeout


def test_deadlines_come_due_after_the_timeout_they_were_told_and_once() -> None:
    d = ctdeadlines.Deadlines()
    d.add([(("UDP", "10.0.0.2", 1, "198.51.100.7", 53), 30), (("UDP", "10.0.0.2", 2, "198.51.100.7", 53), 0)], now=100.2)
    assert d.due(101.9) == []  # the kernel rounds down: not before the told seconds and one more have passed
    assert d.due(102.0) == [("UDP", "10.0.0.2", 2, "198.51.100.7", 53)]
    assert d.due(131.9) == [] and len(d) == 1
    assert d.due(132.0) == [("UDP", "10.0.0.2", 1, "198.51.100.7", 53)] and d.due(10_000) == [] and len(d) == 0
    d.add([(("UDP", "10.0.0.3", i, "198.51.100.7", 53), i % 3) for i in range(30)], now=0.0)
    assert len(d.due(100.0, limit=5)) == 10 and len(d) == 20  # whole slots, until the limit is reached


def test_far_deadlines_share_coarse_slots_and_never_come_early() -> None:
    d = ctdeadlines.Deadlines()
    d.add([(("TCP", "10.0.0.2", i, "198.51.100.7", 80), 432_000 + i) for i in range(1000)], now=5.5)
    assert len(d.slots) < 40  # one slot per second would be 1,000
    assert d.due(5.5 + 432_000) == []
    assert len(d.due(5.5 + 432_000 + 1000 + 2 + ctdeadlines._COARSE)) == 1000


def test_the_schedule_keeps_one_deadline_per_entry_held_once_stale_ones_outnumber_the_table() -> None:
    d = ctdeadlines.Deadlines()
    keys = [("TCP", "10.0.0.2", i, "198.51.100.7", 80) for i in range(100)]
    d.add([(k, 432_000) for k in keys], now=0.0)  # established: days ahead
    d.add([(k, 120) for k in keys[:10]], now=0.0)  # ten told again, sooner
    assert len(d) == 110
    d.compact(set(keys[:10]) | set(keys[50:60]))  # the others closed
    assert len(d) == 20
    assert sorted(d.due(200.0)) == sorted(keys[:10])  # the earlier slot kept
    assert sorted(d.due(10**7)) == sorted(keys[50:60]) and len(d) == 0


def test_schedule_sorts_entries_a_get_reaches_from_the_rest_in_one_pass() -> None:
    # _schedule inlines _gettable: the same split as the function, held entries only.
    d = LiveDigest("ns", FakeReader({}), lambda: OWN)  # type: ignore[arg-type]
    d.table = ctdigesttable.DigestTable()
    v4 = [("TCP", "10.0.0.2", i, "198.51.100.7", 80) for i in range(5)]
    zoned = ("UDP", "10.0.0.3", 53, "198.51.100.7", 53, 7)  # a zone: no GET by key
    v6 = ("TCP", "2001:db8::1", 1000, "2001:db8::2", 80)
    other = ("SCTP", "10.0.0.4", 1, "198.51.100.7", 2)
    not_held = ("TCP", "10.0.0.9", 9, "198.51.100.7", 80)
    for i in (*v4, zoned, v6, other):
        d.table.put(i, 1)
    d._schedule({**{i: 120 + n for n, i in enumerate(v4)}, zoned: 300, v6: 200, other: 400, not_held: 5})
    assert [ctdigest._gettable(i) for i in (*v4, zoned, v6, other)] == [True] * 5 + [False] * 3
    assert len(d.deadlines) == 5  # the five IPv4 5-tuples, not the entry that is not held
    assert sorted(d.deadlines.due(10**6)) == sorted(v4)
    assert d._walk_at <= time.monotonic() + 200 + 1  # the soonest of the others (v6, 200 s)
    assert d._walk_at > time.monotonic() + 100
