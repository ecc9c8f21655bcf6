"""Comparing tables by key range, without root: the ranges kept as the table changes, the two operations, the controller's comparison.

* :class:`DigestTable`'s ranges against :func:`model.range_digests` of the
  final table, for random histories of puts, drops and replacements, and the
  ranges' XOR against the whole digest;
* get-range-digests and get-range-sessions through the RPC layer (a memory
  provider) and through a real SSH agent and :class:`NodeClient`;
* :func:`rangecheck.check_by_ranges` and a migration's verify over in-memory
  nodes that declare ``RANGES``: only the differing ranges are read, missing
  sessions are reconciled, a re-mapped one fails, too much difference falls
  back to the whole read.
"""

from __future__ import annotations

import time
import zlib
from functools import reduce
from operator import xor
from pathlib import Path
from typing import Collection, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from natmig.agent.ctdigesttable import DigestTable
from natmig.agent.provider import MemoryProvider
from natmig.agent.rpc import SessionState, handle_message
from natmig.agent.monitoring import SessionRecord
from natmig.codec import NETCONF_NS
from natmig.controller.migrate import Endpoint, MigrateOptions, Migration
from natmig.controller.nodeproto import ALL_FEATURES, RANGES as RANGES_FEATURE
from natmig.controller.rangecheck import check_by_ranges, differing_ranges
from natmig.model import RANGES, NatSession, digest_values, format_digest, key_range, range_digests, session_text, table_digest

from .controller_fakes import FakeSteering, sessions
from .strategies import tables
from .test_agent_rpc import FakeServer, errors
from .test_agent_ssh import RunningAgent
from .test_controller_migrate import TextNode, keys_map

NS = "urn:natmig:yang:nat-session"


def value(s: NatSession) -> int:
    return digest_values([session_text(s)])[0]


# -- the range of a key ------------------------------------------------------------


def test_a_keys_range_is_the_low_16_bits_of_the_crc32_of_its_text() -> None:
    key = ("TCP", "10.0.0.2", 1000, "198.51.100.1", 80)
    assert key_range(key) == zlib.crc32(b"TCP 10.0.0.2 1000 198.51.100.1 80") & 0xFFFF
    # Fixed by the module's description: a node of another build must agree.
    assert key_range(key) == 0x1F7A


def test_a_remapped_session_stays_in_its_range() -> None:
    s = sessions(1)[0]
    other = NatSession(*s.key, "203.0.113.9", 40000)
    a, b = range_digests([s]), range_digests([other])
    assert a.keys() == b.keys() and a != b


def test_the_ranges_add_up_to_the_whole_table() -> None:
    table = sessions(3000)
    ranges = range_digests(table)
    assert sum(n for n, _ in ranges.values()) == 3000
    assert format_digest(reduce(xor, (acc for _, acc in ranges.values()), 0)) == table_digest(table)
    assert len(ranges) > 2500  # 3,000 keys spread over 65,536 ranges: few share one


# -- DigestTable keeps them ----------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, tuple, NatSession | None]]:
    """put (translated or not), replace (another mapping), drop, over a pool of keys."""
    pool = draw(tables)
    steps: list[tuple[str, tuple, NatSession | None]] = []
    for _ in range(draw(st.integers(0, 60))):
        if not pool:
            break
        s = draw(st.sampled_from(pool))
        kind = draw(st.sampled_from(["put", "put", "untranslated", "remap", "drop"]))
        if kind == "remap":
            alt = draw(st.sampled_from(pool))
            s = NatSession(*s.key, alt.translated_address, alt.translated_port)
        steps.append(("drop", s.key, None) if kind == "drop" else ("put", s.key, None if kind == "untranslated" else s))
    return steps


@given(histories())
@settings(max_examples=300, deadline=None)
def test_ranges_kept_through_puts_drops_and_replacements_equal_a_full_recomputation(steps) -> None:
    t = DigestTable()
    final: dict[tuple, NatSession | None] = {}
    for kind, k, s in steps:
        if kind == "drop":
            t.drop(k)
            final.pop(k, None)
        else:
            t.put(k, None if s is None else value(s))
            final[k] = s
    translated = [s for s in final.values() if s is not None]
    assert t.ranges() == range_digests(translated)
    assert format_digest(reduce(xor, (acc for _, acc in t.ranges().values()), 0)) == table_digest(translated) == format_digest(t.acc)
    assert sorted(t.in_ranges(list(t.ranges()))) == sorted(s.key for s in translated)


def test_a_copy_created_at_once_keeps_the_ranges_as_puts_do() -> None:
    table = sessions(500)
    bulk, each = DigestTable(), DigestTable()
    bulk.created(table)
    for s in table:
        each.put(s.key, value(s))
    assert bulk.ranges() == each.ranges() == range_digests(table)
    some = sorted(bulk.ranges())[:7]
    assert sorted(bulk.in_ranges(some)) == sorted(s.key for s in table if key_range(s.key) in some)


def test_untranslated_entries_are_in_no_range() -> None:
    t = DigestTable()
    s = sessions(1)[0]
    t.put(s.key, None)
    assert t.ranges() == {} and t.in_ranges(range(RANGES)) == []
    t.put(s.key, value(s))  # it became a session
    assert t.ranges() == range_digests([s])
    t.put(s.key, None)
    assert t.ranges() == {}


# -- the two operations -----------------------------------------------------------------


def call(srv: FakeServer, body: str) -> etree._Element:
    sess = SessionState(SessionRecord(1, "natmig", "127.0.0.1", time.time()))
    return etree.fromstring(handle_message(srv, sess, f'<rpc xmlns="{NETCONF_NS}" message-id="1">{body}</rpc>'.encode()))


@pytest.fixture
def srv() -> FakeServer:
    s = FakeServer()
    s.provider.apply(sessions(40))
    return s


def test_get_range_digests_lists_every_non_empty_range(srv: FakeServer) -> None:
    reply = call(srv, f'<get-range-digests xmlns="{NS}"/>')
    got = {int(r.findtext(f"{{{NS}}}id")): (int(r.findtext(f"{{{NS}}}sessions")), int(r.findtext(f"{{{NS}}}digest"), 16))
           for r in reply.iter(f"{{{NS}}}range")}
    assert got == range_digests(sessions(40))


def test_get_range_digests_of_an_empty_table_is_ok() -> None:
    reply = call(FakeServer(), f'<get-range-digests xmlns="{NS}"/>')
    assert reply.find(f"{{{NETCONF_NS}}}ok") is not None


def test_get_range_sessions_returns_only_the_sessions_of_those_ranges(srv: FakeServer) -> None:
    table = sessions(40)
    want = sorted({key_range(s.key) for s in table[:3]})
    reply = call(srv, f'<get-range-sessions xmlns="{NS}">' + "".join(f"<range>{r}</range>" for r in want) + "</get-range-sessions>")
    got = srv.codec.decode_xml(reply)
    assert sorted(s.key for s in got) == sorted(s.key for s in table if key_range(s.key) in want)


@pytest.mark.parametrize("body, tag", [
    ("", "missing-element"),
    ("<range>65536</range>", "invalid-value"),
    ("<range>-1</range>", "invalid-value"),
    ("<range>x</range>", "invalid-value"),
    ("<ranges>1</ranges>", "unknown-element"),
])
def test_get_range_sessions_refuses_bad_input_by_name(srv: FakeServer, body: str, tag: str) -> None:
    reply = call(srv, f'<get-range-sessions xmlns="{NS}">{body}</get-range-sessions>')
    assert [e["error-tag"] for e in errors(reply)] == [tag]


def test_an_operation_of_another_namespace_is_not_supported(srv: FakeServer) -> None:
    reply = call(srv, '<get-range-digests xmlns="urn:example:other"/>')
    assert [e["error-tag"] for e in errors(reply)] == ["operation-not-supported"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    a = RunningAgent(tmp_path, MemoryProvider(owned={"203.0.113.1"}, table={s.key: s for s in sessions(300)}))
    try:
        yield a
    finally:
        a.stop()


def test_node_client_reads_ranges_over_ssh(agent: RunningAgent) -> None:
    with agent.client() as c:
        assert RANGES_FEATURE in c.features
        digests = c.get_range_digests()
        assert digests == range_digests(sessions(300))
        some = sorted(digests)[:5]
        got = c.get_range_sessions(some)
        assert sorted(s.key for s in got) == sorted(s.key for s in sessions(300) if key_range(s.key) in some)
        assert got and all(s in sessions(300) for s in got)  # every leaf as stored
        assert c.get_range_sessions([]) == []


# -- the controller's comparison -----------------------------------------------------------


class RangeNode(TextNode):
    """A node that declares every feature, the comparison by key range included (as NodeClient does)."""

    features = ALL_FEATURES

    def get_range_digests(self) -> dict[int, tuple[int, int]]:
        self._enter("get-range-digests")
        return self.provider.range_digests()

    def get_range_sessions(self, ranges: Collection[int]) -> list[NatSession]:
        self._enter("get-range-sessions")
        got = self.provider.range_sessions(ranges)
        self.read.append(len(got))
        return got


def range_setup(n: int) -> tuple[RangeNode, RangeNode, FakeSteering]:
    src = RangeNode("nat1", MemoryProvider(table={s.key: s for s in sessions(n)}))
    tgt = RangeNode("nat2", MemoryProvider())
    src.read, tgt.read = [], []
    return src, tgt, FakeSteering("nat1")


def test_differing_ranges_counts_a_range_one_side_lacks() -> None:
    assert differing_ranges({1: (1, 5), 2: (2, 6), 3: (1, 1)}, {1: (1, 5), 2: (2, 7), 4: (1, 1)}) == [2, 3, 4]
    assert differing_ranges({}, {}) == []


def test_check_by_ranges_reads_only_what_differs() -> None:
    src, tgt, _ = range_setup(0)
    table = sessions(2000)
    src.provider.apply(table)
    lost, remapped = table[10:14], table[50]
    tgt.provider.apply([s for s in table if s not in lost and s is not remapped] + [NatSession(*remapped.key, "203.0.113.1", 60000)])
    got = check_by_ranges(src, tgt)
    assert got is not None
    assert sorted(s.key for s in got.verdict.missing) == sorted(s.key for s in lost)
    assert [s.key for s, _ in got.verdict.remapped] == [remapped.key]
    assert got.verdict.checked == 2000 and got.verdict.extra == 0
    assert got.differing == len({key_range(s.key) for s in [*lost, remapped]})
    # A few sessions a range: the differing ranges' sessions, not the table.
    assert got.read_source == sum(1 for s in table if key_range(s.key) in {key_range(x.key) for x in [*lost, remapped]}) < 20
    assert got.read_target == got.read_source - len(lost)


def test_check_by_ranges_gives_up_when_most_differs() -> None:
    src, tgt, _ = range_setup(100)
    tgt.provider.apply(sessions(10))
    assert check_by_ranges(src, tgt) is None


def run(src, tgt, sw, **opts):
    return Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", lambda: tgt), sw, MigrateOptions(**opts)).run()


def test_verify_reads_only_the_differing_ranges_and_reconciles_what_the_target_lost() -> None:
    src, tgt, sw = range_setup(1500)
    lost = sessions(1500)[100:105]
    tgt.hooks["set-admission:False"] = lambda: tgt.provider.delete([s.key for s in lost])
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == r.target_check == "ranges"
    assert r.reconciled == 5 and r.verified == 1500
    assert keys_map(tgt) == keys_map(src)
    # The whole tables were never read again (the source's snapshot is the copy's only read).
    assert src.calls.count("get-config:running") == 1
    assert not any(c.startswith("get-config") for c in tgt.calls[tgt.calls.index("get-range-digests"):]), tgt.calls
    # The differing ranges of both nodes, then those of what was written, on the target again.
    assert tgt.read == [sum(src.read) - 5, sum(src.read)] and src.read[0] < 20
    assert r.range_sessions_read == sum(src.read) + sum(tgt.read)
    verify = next(p for p in r.phases if p.name == "verify")
    assert "range-digests" in verify.steps and "range-sessions" in verify.steps


def test_verify_by_ranges_refuses_a_remapping_target_and_points_traffic_back() -> None:
    src, tgt, sw = range_setup(300)
    tgt.remap = True
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "verify" and "re-mapped" in r.error
    assert sw.moves == ["nat2", "nat1"]


def test_equal_digests_need_no_ranges() -> None:
    src, tgt, sw = range_setup(50)
    r = run(src, tgt, sw, retire="keep")
    assert r.ok and r.source_check == r.target_check == "digest"
    assert "get-range-digests" not in src.calls + tgt.calls


def test_a_node_without_the_feature_gets_the_whole_read() -> None:
    src, tgt, sw = range_setup(60)
    plain = TextNode("nat2", tgt.provider)
    plain.hooks["set-admission:False"] = lambda: plain.provider.delete([sessions(60)[3].key])
    r = run(src, plain, sw, retire="keep")
    assert r.ok, r.error
    assert r.target_check == "read" and r.reconciled == 1 and r.range_sessions_read is None
    assert "get-range-digests" not in src.calls


def test_a_read_only_user_may_read_by_range(tmp_path: Path) -> None:
    """They read what get and get-config read: access "read", not "exec" or "write"."""
    from natmig.agent.nacm import load

    (tmp_path / "nacm.toml").write_text('[groups]\nadmin = ["natmig"]\n')
    ac = load(tmp_path / "nacm.toml")
    for op in ("get-range-digests", "get-range-sessions"):
        assert ac.decide("bob", op).permitted, op
    (tmp_path / "nacm.toml").write_text('read-default = "deny"\n')
    assert not load(tmp_path / "nacm.toml").decide("bob", "get-range-sessions").permitted


def test_an_agent_of_an_earlier_revision_gets_the_whole_read() -> None:
    """The client can ask; an agent announcing nat-session 2026-11-24 has no such operations: verify reads the tables, the move succeeds."""
    src, tgt, sw = range_setup(60)
    src.revision = tgt.revision = "2026-11-24"
    tgt.hooks["set-admission:False"] = lambda: tgt.provider.delete([sessions(60)[3].key])
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.target_check == "read" and r.reconciled == 1 and r.range_sessions_read is None
    assert "get-range-digests" not in src.calls + tgt.calls
