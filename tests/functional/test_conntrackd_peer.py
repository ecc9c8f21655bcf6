"""conntrackd as the benchmark's peer, against the real kernel: sync 1k NAT entries over FTFW, commit them, leave nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from natmig import netns
from natmig.agent.ctbulk import create_sessions
from natmig.agent.ctread import EntryReader
from natmig.model import NatSession
from natmig.testbed.conntrackd import SYNC_IF, ConntrackdError, ConntrackdPair, pids_of

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("conntrackd") is None, reason="conntrackd not installed (make system)")]


def sessions(n: int) -> list[NatSession]:
    """``n`` translated sessions, TCP and UDP, each with its own public port."""
    return [
        NatSession("TCP" if i % 2 == 0 else "UDP", f"10.0.0.{100 + i // 20000}", 1024 + i % 20000, "203.0.113.200", 443,
                   "203.0.113.1", 30000 + i, "ESTABLISHED" if i % 2 == 0 else None, 900, True)
        for i in range(n)
    ]


def mapping(ns: str) -> set[tuple]:
    """What a NAT keeps of each translated entry of ``ns``: its key and its public endpoint."""
    reader = EntryReader(ns)
    try:
        return {(s.key, s.translated_address, s.translated_port, s.tcp_state) for s in reader.flows() if s.translated_port != s.src_port}
    finally:
        reader.close()


@pytest.fixture
def pair_ns():
    """Two fresh namespaces (source, target) and a run dir for the pair, always removed."""
    prefix = netns.run_prefix("ctd")
    a, b = f"{prefix}-a", f"{prefix}-b"
    home = Path("/run/natmig") / prefix / "conntrackd"
    try:
        netns.add(a)
        netns.add(b)
        yield a, b, home
    finally:
        netns.delete(a)
        netns.delete(b)
        shutil.rmtree(home.parent, ignore_errors=True)


def assert_nothing_left(pair: ConntrackdPair) -> None:
    assert pair.pids() == {"a": [], "b": []}
    for ns in pair.ns.values():
        assert not netns.link_exists(SYNC_IF, ns)
    assert not pair.home.exists()


def test_sync_of_1k_entries_then_commit_into_the_target(pair_ns) -> None:
    a, b, home = pair_ns
    table = sessions(1000)
    assert create_sessions(a, [(s, 900) for s in table]) == {}
    want = mapping(a)
    assert len(want) == 1000
    with ConntrackdPair(a, b, home) as pair:
        assert all(len(p) == 1 for p in pair.pids().values()), pair.pids()
        # Each daemon reads its own kernel's table as it starts.
        pair.wait_internal("a", 1000, timeout=30)
        assert pair.counts("b").external == 0
        assert pair.sync(1000, timeout=60) > 0
        assert pair.counts("b").external == 1000
        assert mapping(b) == set()  # received, not yet in the target's kernel
        took, committed, logged = pair.commit()
        assert committed == 1000 and logged is not None and took > 0
        # The target's kernel now holds every session with its public port (the NAT mapping survived).
        assert mapping(b) == want
    assert_nothing_left(pair)


def test_a_failure_inside_leaves_nothing_behind(pair_ns) -> None:
    a, b, home = pair_ns
    with pytest.raises(ConntrackdError, match="entries in its external cache"):
        with ConntrackdPair(a, b, home) as pair:
            assert pair.pids()["a"]
            pair.sync(5, timeout=0.5)  # an empty source: the target never gets 5
    assert_nothing_left(pair)
    assert pids_of(pair.config("a")) == []


def test_a_failed_start_leaves_nothing_behind(pair_ns) -> None:
    a, _b, home = pair_ns
    pair = ConntrackdPair(a, "nonexistent-ns", home)
    with pytest.raises(netns.CommandError, match="nonexistent-ns"):
        with pair:
            pass
    assert_nothing_left(pair)
