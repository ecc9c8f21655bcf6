"""Unit tests (no root) of the conntrack text formats and the provider's entry validation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.agent import cttext
from natmig.agent.ctbatch import invalid_entries, plan_apply, validate
from natmig.codec import default_codec
from natmig.model import NatSession, digest_xor, format_digest, table_digest

from .strategies import ipv4, sessions

# Lines as conntrack v1.4.7 printed them on this kind of machine.
REAL = """\
tcp      6 299 ESTABLISHED src=10.0.0.3 dst=203.0.113.100 sport=40000 dport=80 src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20001 [ASSURED] mark=7 use=1
udp      17 28 src=10.0.0.2 dst=203.0.113.100 sport=5353 dport=53 src=203.0.113.100 dst=203.0.113.1 sport=53 dport=21899 mark=0 use=1
icmp     1 28 src=10.0.0.2 dst=203.0.113.100 type=8 code=0 id=6417 src=203.0.113.100 dst=203.0.113.1 type=0 code=0 id=21876 mark=0 use=1
icmp     1 28 src=10.0.0.2 dst=203.0.113.1 type=8 code=0 id=6418 src=203.0.113.1 dst=10.0.0.2 type=0 code=0 id=6418 mark=0 use=1
tcp      6 118 SYN_SENT src=10.0.0.2 dst=203.0.113.100 sport=60788 dport=80 [UNREPLIED] src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20521 mark=0 use=1
udp      17 20 src=203.0.113.5 dst=203.0.113.1 sport=1000 dport=53 src=10.0.0.9 dst=203.0.113.5 sport=53 dport=1000 mark=0 use=1
tcp      6 10 NONE src=10.0.0.2 dst=203.0.113.100 sport=1 dport=80 src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20002 mark=0 use=1
sctp     132 10 CLOSED src=10.0.0.2 dst=203.0.113.100 sport=1 dport=80 src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20003 mark=0 use=1
udp      17 0 src=10.0.0.4 dst=203.0.113.100 sport=9 dport=9 packets=3 bytes=99 src=203.0.113.100 dst=203.0.113.1 sport=9 dport=20009 packets=1 bytes=33 [ASSURED] mark=5 use=1
tcp      6 50 ESTABLISHED src=10.0.0.5 dst=203.0.113.100 sport=9 dport=9 src=203.0.113.100 dst=203.0.113.1 sport=9 dport=20010 [ASSURED] [OFFLOAD] mark=6 zone=1 use=1
"""


def test_parse_real_lines() -> None:
    t = cttext.parse_table(REAL)
    got = {s.key: s for s in t.sessions}
    assert got[("TCP", "10.0.0.3", 40000, "203.0.113.100", 80)] == NatSession(
        "TCP", "10.0.0.3", 40000, "203.0.113.100", 80, "203.0.113.1", 20001, "ESTABLISHED", 299, True, 7)
    assert got[("UDP", "10.0.0.2", 5353, "203.0.113.100", 53)].translated_port == 21899
    icmp = got[("ICMP", "10.0.0.2", 6417, "203.0.113.100", 0)]
    assert (icmp.translated_port, icmp.tcp_state, icmp.timeout) == (21876, None, 28)
    assert got[("TCP", "10.0.0.2", 60788, "203.0.113.100", 80)].tcp_state == "SYN_SENT"
    # Counters between the fields, a zero timeout (the module's minimum is 1).
    acct = got[("UDP", "10.0.0.4", 9, "203.0.113.100", 9)]
    assert (acct.translated_port, acct.assured, acct.mark, acct.timeout) == (20009, True, 5, 1)
    # A status tag the fast pattern does not expect: the slow path still reads it.
    off = got[("TCP", "10.0.0.5", 9, "203.0.113.100", 9)]
    assert (off.assured, off.mark) == (True, 6)
    # Not returned, but counted: ICMP to the node itself, a DNAT-ed flow, TCP NONE, SCTP.
    assert len(t.sessions) == 6 and t.untranslated == 4


def test_parse_empty_and_without_final_newline() -> None:
    assert cttext.parse_table("") == cttext.Table([], 0)
    one = REAL.splitlines()[0]
    assert len(cttext.parse_table(one).sessions) == 1


def render_list_line(s: NatSession) -> str:
    """How conntrack -L prints a translated session (the test's own renderer)."""
    tail = (" [ASSURED]" if s.assured else "") + f" mark={s.mark} use=1"
    if s.protocol == "ICMP":
        return (f"icmp     1 {s.timeout} src={s.src_address} dst={s.dst_address} type=8 code=0 id={s.src_port} "
                f"src={s.dst_address} dst={s.translated_address} type=0 code=0 id={s.translated_port}{tail}\n")
    num = 6 if s.protocol == "TCP" else 17
    state = f" {s.tcp_state}" if s.tcp_state else ""
    return (f"{s.protocol.lower()}      {num} {s.timeout}{state} src={s.src_address} dst={s.dst_address} "
            f"sport={s.src_port} dport={s.dst_port} src={s.dst_address} dst={s.translated_address} "
            f"sport={s.dst_port} dport={s.translated_port}{tail}\n")


translated = sessions().filter(lambda s: s.protocol == "ICMP" or s.translated_port != s.src_port).map(
    lambda s: dataclasses.replace(
        s, src_address="10.0.0.2", dst_address="198.51.100.7", translated_address="203.0.113.1",
        timeout=s.timeout or 1, tcp_state="SYN_SENT2" if s.tcp_state == "NONE" else s.tcp_state,
    )
)


@given(st.lists(translated, max_size=20, unique_by=lambda s: s.key))
@settings(max_examples=150, deadline=None)
def test_parse_reads_back_every_field(table: list[NatSession]) -> None:
    # ICMP with equal ids is "not translated" by definition; leave those out.
    table = [s for s in table if not (s.protocol == "ICMP" and s.translated_port == s.src_port)]
    got = cttext.parse_table("".join(render_list_line(s) for s in table))
    assert sorted(got.sessions, key=lambda s: s.key) == sorted(table, key=lambda s: s.key)
    assert got.untranslated == 0


def test_parse_event_lines() -> None:
    new = cttext.parse_event("    [NEW] udp      17 61 src=10.0.0.11 dst=203.0.113.100 sport=1234 dport=80 src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20011 mark=0 [USERSPACE] portid=7343\n")
    assert new is not None and new.kind == "new" and new.session.translated_port == 20011
    gone = cttext.parse_event("[DESTROY] tcp      6 src=10.0.0.2 dst=203.0.113.100 sport=60788 dport=80 src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20521 [ASSURED]\n")
    # A destroy line without a state still reports the session (state unknown).
    assert gone is not None and gone.kind == "destroy" and gone.session.tcp_state is None
    assert gone.session.assured and gone.session.translated_port == 20521
    gone = cttext.parse_event("[DESTROY] icmp     1 src=10.0.0.2 dst=203.0.113.100 type=8 code=0 id=7332 src=203.0.113.100 dst=203.0.113.1 type=0 code=0 id=20653\n")
    assert gone is not None and gone.kind == "destroy" and gone.session.timeout is None
    assert cttext.parse_event(" [UPDATE] udp      17 61 src=10.0.0.11 dst=203.0.113.100 sport=1234 dport=80 src=203.0.113.100 dst=203.0.113.1 sport=80 dport=20011\n") is None
    assert cttext.parse_event("    [NEW] icmp     1 30 src=10.0.0.2 dst=10.0.0.1 type=8 code=0 id=1 [UNREPLIED] src=10.0.0.1 dst=10.0.0.2 type=0 code=0 id=1\n") is None


def test_seen_reply() -> None:
    base = NatSession("TCP", "10.0.0.3", 1, "203.0.113.100", 80, "203.0.113.1", 20001)
    assert cttext.seen_reply(base)  # default state ESTABLISHED
    assert not cttext.seen_reply(dataclasses.replace(base, tcp_state="SYN_SENT"))
    assert cttext.seen_reply(dataclasses.replace(base, tcp_state="SYN_SENT", assured=True))
    assert cttext.seen_reply(dataclasses.replace(base, protocol="UDP"))


GOOD = NatSession("UDP", "10.0.0.2", 5000, "198.51.100.1", 53, "203.0.113.1", 20000, None, 30, False, 0)

BAD = {
    "protocol": dataclasses.replace(GOOD, protocol="SCTP"),
    "src_address": dataclasses.replace(GOOD, src_address="2001:db8::1"),
    "dst_address": dataclasses.replace(GOOD, dst_address="10.0.0.256"),
    "translated_address": dataclasses.replace(GOOD, translated_address="x"),
    "src_port": dataclasses.replace(GOOD, src_port=70000),
    "dst_port": dataclasses.replace(GOOD, protocol="ICMP", dst_port=53),
    "translated_port": dataclasses.replace(GOOD, translated_port=0),
    "tcp_state": dataclasses.replace(GOOD, tcp_state="ESTABLISHED"),
    "timeout": dataclasses.replace(GOOD, timeout=0),
    "mark": dataclasses.replace(GOOD, mark=-1),
}


@pytest.mark.parametrize("leaf", sorted(BAD))
def test_validate_names_the_leaf(leaf: str) -> None:
    why = validate(BAD[leaf])
    assert why is not None and why.startswith(leaf), why
    assert invalid_entries([GOOD, BAD[leaf]]) == {BAD[leaf].key: why}


def test_validate_accepts_good_entries() -> None:
    assert validate(GOOD) is None
    assert validate(dataclasses.replace(GOOD, protocol="TCP", tcp_state="SYN_SENT2")) is None
    assert validate(dataclasses.replace(GOOD, protocol="ICMP", dst_port=0, translated_port=0)) is None
    assert validate(dataclasses.replace(GOOD, timeout=None, mark=2**32 - 1)) is None
    assert validate(dataclasses.replace(GOOD, protocol="TCP", tcp_state="LISTEN")) is not None


@given(sessions(), ipv4)
@settings(max_examples=300, deadline=None)
def test_fast_batch_check_agrees_with_validate(s: NatSession, addr: str) -> None:
    for x in (s, dataclasses.replace(s, src_address=addr)):
        why = validate(x)
        assert invalid_entries([x]) == ({} if why is None else {x.key: why})


def test_plan_sorts_a_batch_by_how_it_reaches_the_kernel() -> None:
    live = NatSession("TCP", "10.0.0.2", 1, "198.51.100.1", 80, "203.0.113.1", 20000, "ESTABLISHED", 100)
    moved = NatSession("UDP", "10.0.0.2", 2, "198.51.100.1", 53, "203.0.113.1", 20001)
    existing = {live.key: live, moved.key: moved}
    same = dataclasses.replace(live, timeout=50, mark=3)             # same translation: in place
    other = dataclasses.replace(moved, translated_port=20002)         # another translation: replace
    new_tcp = NatSession("TCP", "10.0.0.3", 1, "198.51.100.1", 80, "203.0.113.1", 20003)
    new_icmp = NatSession("ICMP", "10.0.0.3", 7, "198.51.100.1", 0, "203.0.113.1", 20004)
    plan = plan_apply([same, other, new_tcp, new_icmp], existing, [50, 60, 70, 80])
    assert plan.update == [(same, 50)]
    assert plan.replace == [moved]
    assert plan.create == [(other, 60), (new_tcp, 70), (new_icmp, 80)]
    # Into an empty table everything is a create, in batch order.
    assert plan_apply([new_icmp, new_tcp], {}, [1, 2]).create == [(new_icmp, 1), (new_tcp, 2)]
    assert plan_apply([], existing, []) == type(plan)()


# Entries that are not sessions but hold tuples a session's reply could need.
HOLDERS = """\
tcp      6 99 ESTABLISHED src=198.51.100.1 dst=203.0.113.1 sport=80 dport=20005 [UNREPLIED] src=203.0.113.1 dst=198.51.100.1 sport=20005 dport=80 mark=0 use=1
udp      17 20 src=203.0.113.1 dst=198.51.100.2 sport=20006 dport=53 src=198.51.100.2 dst=203.0.113.1 sport=53 dport=20006 mark=0 use=1
tcp      6 10 NONE src=10.0.0.2 dst=198.51.100.3 sport=1 dport=80 src=198.51.100.3 dst=203.0.113.1 sport=80 dport=20007 mark=0 use=1
icmp     1 28 src=203.0.113.1 dst=198.51.100.4 type=8 code=0 id=20008 src=198.51.100.4 dst=203.0.113.1 type=0 code=0 id=20008 mark=0 use=1
icmp     1 28 src=203.0.113.1 dst=198.51.100.4 type=13 code=0 id=20009 src=198.51.100.4 dst=203.0.113.1 type=14 code=0 id=20009 mark=0 use=1
tcp      6 299 ESTABLISHED src=10.0.0.3 dst=198.51.100.5 sport=40000 dport=80 src=198.51.100.5 dst=203.0.113.1 sport=80 dport=20010 [ASSURED] mark=7 use=1
"""


def test_parse_table_records_the_tuples_of_what_is_not_a_session() -> None:
    taken: dict = {}
    t = cttext.parse_table(HOLDERS, taken)
    assert [s.translated_port for s in t.sessions] == [20010] and t.untranslated == 5
    # Inbound untranslated TCP: its original tuple is the reply tuple of a session 203.0.113.1:20005 -> 198.51.100.1:80.
    assert taken[("TCP", "203.0.113.1", 20005, "198.51.100.1", 80)] == ("TCP", "198.51.100.1", 80, "203.0.113.1", 20005)
    # The node's own outbound UDP: its reply tuple.
    assert taken[("UDP", "203.0.113.1", 20006, "198.51.100.2", 53)] == ("UDP", "203.0.113.1", 20006, "198.51.100.2", 53)
    # A translated flow in state NONE is no session but holds its reply tuple.
    assert ("TCP", "203.0.113.1", 20007, "198.51.100.3", 80) in taken
    # ICMP echo from the node: the reply direction (type 0) only; other ICMP types cannot clash.
    assert taken[("ICMP", "203.0.113.1", 20008, "198.51.100.4", 0)] == ("ICMP", "203.0.113.1", 20008, "198.51.100.4", 0)
    assert not any(k[2] in (20009, 20010) for k in taken)
    # Without the dict: the same table.
    assert cttext.parse_table(HOLDERS) == t


def test_held_elsewhere_names_entries_whose_reply_tuple_is_taken() -> None:
    from natmig.agent.ctbatch import held_elsewhere

    taken: dict = {}
    cttext.parse_table(HOLDERS, taken)
    clash = NatSession("TCP", "10.0.0.9", 1234, "198.51.100.1", 80, "203.0.113.1", 20005, "ESTABLISHED", 100)
    other_remote = dataclasses.replace(clash, src_port=1235, dst_port=81)
    icmp = NatSession("ICMP", "10.0.0.9", 7, "198.51.100.4", 0, "203.0.113.1", 20008)
    got = held_elsewhere([clash, other_remote, icmp], taken)
    assert set(got) == {clash.key, icmp.key}
    assert "198.51.100.1:80 -> 203.0.113.1:20005" in got[clash.key] and "20005" in got[clash.key]
    assert held_elsewhere([clash], {}) == {}


# -- the fast read (findall over bytes) against the line-by-line one ----------

_ADDRS = ["10.0.0.2", "10.0.0.21", "198.51.100.7", "198.51.100.70", "203.0.113.1", "203.0.113.10"]


@st.composite
def dump_lines(draw: st.DrawFn) -> str:
    """One line in any of the forms conntrack prints, translated or not, regular or odd."""
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "sctp"]))
    num = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132}[proto]
    src, dst, rdst = (draw(st.sampled_from(_ADDRS)) for _ in range(3))
    rsrc = draw(st.sampled_from([dst, dst, dst, draw(st.sampled_from(_ADDRS))]))  # sometimes destination-NATed
    sport, dport = draw(st.sampled_from([1, 9, 53, 80, 20001])), draw(st.sampled_from([1, 9, 53, 80]))
    rsport = draw(st.sampled_from([dport, dport, dport, 81]))
    rdport = draw(st.sampled_from([sport, 20001, 20002, 9]))  # sometimes not translated at all
    event = draw(st.sampled_from(["", "", "    [NEW] ", "[DESTROY] "]))
    timeout = draw(st.sampled_from([" 299", " 0", " 28", ""]))
    state = draw(st.sampled_from(["ESTABLISHED", "SYN_SENT", "LISTEN", "CLOSE", "CLOSE_WAIT", "SYN_SENT2", "NONE", ""])) if proto in ("tcp", "sctp") else ""
    state = f" {state}" if state else ""
    acct = draw(st.booleans())
    c1, c2 = (" packets=3 bytes=99", " packets=1 bytes=33") if acct else ("", "")
    unreplied = draw(st.sampled_from(["", "", " [UNREPLIED]"]))
    assured = draw(st.sampled_from(["", " [ASSURED]"]))
    mark = draw(st.sampled_from([" mark=0", " mark=7", ""]))
    extra = draw(st.sampled_from(["", " [OFFLOAD]", " zone=1"]))
    if draw(st.booleans()):
        tail = f"{assured}{mark}{extra} use=1"  # conntrack's order
    else:
        tail = f"{extra}{assured} use=1{mark}"  # tags where the fast pattern does not expect them
    if proto == "icmp":
        itype = draw(st.sampled_from([8, 8, 13]))
        ident, rident = draw(st.sampled_from([5, 6])), draw(st.sampled_from([5, 20009]))
        body = (f"src={src} dst={dst} type={itype} code=0 id={ident}{c1}{unreplied} "
                f"src={rsrc} dst={rdst} type={0 if itype == 8 else 14} code=0 id={rident}{c2}")
    else:
        body = (f"src={src} dst={dst} sport={sport} dport={dport}{c1}{unreplied} "
                f"src={rsrc} dst={rdst} sport={rsport} dport={rdport}{c2}")
    return f"{event}{proto:<8} {num}{timeout}{state} {body}{tail}"


@given(st.lists(dump_lines(), max_size=25), st.booleans())
@settings(max_examples=400, deadline=None)
def test_fast_parse_and_summary_agree_with_the_line_by_line_parse(lines: list[str], final_newline: bool) -> None:
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    want = cttext._parse_lines(text)
    # str and bytes, and the taken path (which reads line by line and must agree on the sessions too).
    assert cttext.parse_table(text) == cttext.parse_table(text.encode()) == want
    assert cttext.parse_table(text, {}) == want
    got = cttext.summarize_table(text.encode())
    assert (got.sessions, got.untranslated) == (len(want.sessions), want.untranslated)
    assert format_digest(got.digest) == table_digest(want.sessions)


@pytest.mark.parametrize("text", [REAL, HOLDERS, REAL + HOLDERS, REAL.rstrip("\n"), ""])
def test_fast_parse_of_real_lines_is_the_line_by_line_parse(text: str) -> None:
    want = cttext._parse_lines(text)
    assert cttext.parse_table(text.encode()) == want
    s = cttext.summarize_table(text.encode())
    assert (s.sessions, s.untranslated, format_digest(s.digest)) == (len(want.sessions), want.untranslated, table_digest(want.sessions))


def test_fast_parse_keeps_every_field_and_its_meaning() -> None:
    # Hand-built expectations, independent of either parser.
    t = cttext.parse_table(REAL.encode())
    assert [s.protocol for s in t.sessions] == ["TCP", "UDP", "TCP", "UDP", "TCP", "ICMP"]  # TCP/UDP in order, then ICMP
    assert t.sessions[0] == NatSession("TCP", "10.0.0.3", 40000, "203.0.113.100", 80, "203.0.113.1", 20001, "ESTABLISHED", 299, True, 7)
    assert t.sessions[1] == NatSession("UDP", "10.0.0.2", 5353, "203.0.113.100", 53, "203.0.113.1", 21899, None, 28, False, 0)
    assert t.sessions[3].timeout == 1 and (t.sessions[3].assured, t.sessions[3].mark) == (True, 5)
    assert (t.sessions[4].assured, t.sessions[4].mark) == (True, 6)  # [OFFLOAD] before the mark
    assert t.sessions[5] == NatSession("ICMP", "10.0.0.2", 6417, "203.0.113.100", 0, "203.0.113.1", 21876, None, 28, False, 0)
    assert t.untranslated == 4
    listen = "tcp      6 5 LISTEN src=10.0.0.2 dst=198.51.100.1 sport=5 dport=6 src=198.51.100.1 dst=203.0.113.1 sport=6 dport=20000 [ASSURED] use=1 mark=3"
    assert cttext.parse_table(listen).sessions == [
        NatSession("TCP", "10.0.0.2", 5, "198.51.100.1", 6, "203.0.113.1", 20000, "SYN_SENT2", 5, True, 3)]


def test_summary_of_parts_adds_up_to_the_whole() -> None:
    lines = (REAL + HOLDERS).splitlines(keepends=True)
    whole = cttext.summarize_table("".join(lines).encode())
    parts = [cttext.summarize_table("".join(lines[i:i + 3]).encode()) for i in range(0, len(lines), 3)]
    total = cttext.TableSummary(0, 0, 0)
    for p in parts:
        total = total.plus(p)
    assert total == whole and whole.sessions == 7 and whole.digest != 0


def test_digest_xor_is_table_digests_accumulator() -> None:
    ss = [NatSession("TCP", "10.0.0.2", 1, "198.51.100.7", 80, "203.0.113.1", 20000, "ESTABLISHED"),
          NatSession("ICMP", "10.0.0.2", 7, "198.51.100.7", 0, "203.0.113.1", 20001)]
    texts = [f"{s.protocol} {s.src_address} {s.src_port} {s.dst_address} {s.dst_port} {s.translated_address} {s.translated_port}".encode() for s in ss]
    assert format_digest(digest_xor(texts)) == table_digest(ss) != format_digest(digest_xor(texts[:1]))
    assert format_digest(digest_xor([])) == table_digest([]) == "0" * 16


# -- the XML entries written straight from the text, against the general path --

def _general_xml(text: str) -> bytes:
    return default_codec().encode_xml(cttext.parse_table(text.encode()).sessions, root=None)


def _mark_in_place(line: str) -> bool:
    return "mark=" in line and line.index("mark=") < line.index("use=1")


@given(st.one_of(st.lists(dump_lines(), max_size=25),
                 # Every line with its mark where conntrack prints it: the direct path, not the fallback.
                 st.lists(dump_lines().filter(_mark_in_place), max_size=25)), st.booleans(), st.booleans())
@settings(max_examples=600, deadline=None)
def test_entries_xml_is_the_codec_encoding_of_the_parsed_sessions(lines: list[str], final_newline: bool, zeros: bool) -> None:
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    if zeros:
        # Ports and timeouts with leading zeros: written as the records' ints would be.
        text = text.replace("port=", "port=00").replace(" 299 ", " 0299 ")
    assert cttext.entries_xml(text.encode(), default_codec()) == _general_xml(text)


@pytest.mark.parametrize("text", [REAL, HOLDERS, REAL + HOLDERS, REAL.rstrip("\n"), "",
                                  REAL.replace("10.0.0.3", "10.0.0.\u00b3"), REAL.replace("mark=7 ", "")])
def test_entries_xml_of_real_lines_and_odd_text_is_the_general_path(text: str) -> None:
    assert cttext.entries_xml(text.encode(), default_codec()) == _general_xml(text)


def test_entries_xml_of_conntracks_usual_lines_builds_no_records(monkeypatch: pytest.MonkeyPatch) -> None:
    # The lines conntrack prints for a table of sessions take the direct path
    # (the general one would parse them into records first), and read back as those sessions.
    usual = "".join(line + "\n" for line in REAL.splitlines() if "OFFLOAD" not in line)
    want = cttext.parse_table(usual.encode()).sessions
    codec = default_codec()
    monkeypatch.setattr(cttext, "parse_table", lambda *a, **k: pytest.fail("took the general path"))
    got = cttext.entries_xml(usual.encode(), codec)
    assert codec.decode_xml(b'<data xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">' + got + b"</data>") == want
    assert len(want) == 5 and b"<tcp_state>SYN_SENT</tcp_state>" in got and b"<assured>true</assured><mark>7</mark>" in got
