"""The batch rules every provider shares, and the in-memory provider's semantics."""

from __future__ import annotations

import threading

import pytest

from natmig.agent.provider import ApplyError, MemoryProvider, check_batch
from natmig.model import NatSession

PUB = "203.0.113.1"


def s(sport: int, dst: str = "198.51.100.7", dport: int = 53, tport: int = 20000, proto: str = "UDP", pub: str = PUB) -> NatSession:
    return NatSession(proto, "10.0.0.2", sport, dst, dport, pub, tport)


def test_public_port_shared_towards_different_remotes_is_accepted() -> None:
    # Linux does this once the port range is busy; a migration must carry it.
    batch = [s(1000, dport=53), s(1001, dport=54), s(1002, dst="198.51.100.8", dport=53)]
    assert check_batch(batch, {}, {PUB}) == {}


def test_same_reply_tuple_is_refused_and_named() -> None:
    existing = {x.key: x for x in [s(1000)]}
    problems = check_batch([s(1001)], existing, {PUB})
    assert list(problems) == [s(1001).key]
    assert "already used by nat-session[UDP 10.0.0.2 1000 198.51.100.7 53]" in problems[s(1001).key]


def test_replacing_an_entry_frees_its_reply_tuple() -> None:
    old = s(1000)
    moved = s(1000, tport=20001)
    newcomer = s(1001)  # takes the old public port of the entry being replaced
    assert check_batch([moved, newcomer], {old.key: old}, {PUB}) == {}


def test_foreign_address_and_duplicates_in_batch() -> None:
    problems = check_batch([s(1, pub="192.0.2.9"), s(2), s(2)], {}, {PUB})
    assert "not an address of this node" in problems[s(1).key]
    assert problems[s(2).key] == "appears twice in the batch"


def test_memory_provider_is_all_or_nothing() -> None:
    p = MemoryProvider(owned={PUB})
    p.apply([s(1000)])
    with pytest.raises(ApplyError) as ei:
        p.apply([s(2000, tport=21000), s(1001)])  # second one clashes with the first session
    assert s(1001).key in ei.value.problems and s(2000).key not in ei.value.problems
    assert [x.key for x in p.list().sessions] == [s(1000).key]


def test_memory_watch_ends_when_closed() -> None:
    p = MemoryProvider(owned={PUB})
    w = p.watch()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(w))
    t.start()
    p.apply([s(1000)])
    w.close()
    t.join(2)
    assert not t.is_alive(), "a closed watch must end its stream"
    assert [e.kind for e in got] == ["new"]  # type: ignore[attr-defined]


def test_memory_provider_statistics_are_the_list_counted_and_digested() -> None:
    from natmig.model import table_digest

    p = MemoryProvider(untranslated=3)
    assert p.statistics() == {"sessions": 0, "untranslated": 3, "digest": "0" * 16}
    p.apply([s(1000), s(1001, tport=20001), s(1002, tport=20002, proto="TCP")])
    got = p.statistics()
    assert got == {"sessions": 3, "untranslated": 3, "digest": table_digest(p.list().sessions)}
    p.delete([s(1001).key])
    assert p.statistics()["sessions"] == 2 and p.statistics()["digest"] != got["digest"]
