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


# -- the uniqueness check without the table, against check_batch ------------------

import dataclasses  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from natmig.agent.provider import SessionTable, check_batch_by_holders  # noqa: E402

from .strategies import sessions as any_session  # noqa: E402

# A table as a NAT holds it: distinct keys and distinct reply tuples.
nat_tables = st.lists(any_session(), max_size=25, unique_by=(lambda x: x.key, lambda x: x.reply_key))


@st.composite
def batch_on(draw: st.DrawFn, table: list[NatSession]) -> list[NatSession]:
    """A batch that touches ``table`` in every way check_batch distinguishes."""
    out: list[NatSession] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["same", "moved", "takes-its-reply", "fresh", "twice", "foreign"] if table else ["fresh", "twice", "foreign"]))
        t = draw(st.sampled_from(table)) if table else None
        if kind == "same":
            out.append(t)  # an update: keeps its own reply tuple
        elif kind == "moved":
            out.append(dataclasses.replace(t, translated_port=draw(st.integers(0, 65535))))
        elif kind == "takes-its-reply":
            # Another key on the reply tuple of a session of the table.
            fresh = draw(any_session())
            out.append(dataclasses.replace(fresh, protocol=t.protocol, dst_address=t.dst_address, dst_port=t.dst_port,
                                           translated_address=t.translated_address, translated_port=t.translated_port))
        elif kind == "fresh":
            out.append(draw(any_session()))
        elif kind == "twice" and out:
            prev = draw(st.sampled_from(out))
            out.append(draw(st.sampled_from([prev, dataclasses.replace(prev, src_port=(prev.src_port + 1) % 65536)])))
        elif kind == "foreign":
            out.append(dataclasses.replace(draw(any_session()), translated_address="192.0.2.254"))
    return out


def holders_of(table: list[NatSession], batch: list[NatSession]) -> dict:
    """What a provider finds for the batch's reply tuples: the table's session holding each."""
    by_reply = {s.reply_key: s.key for s in table}
    return {s.reply_key: by_reply[s.reply_key] for s in batch if s.reply_key in by_reply}


@given(data=st.data(), table=nat_tables)
@settings(max_examples=400, deadline=None)
def test_check_by_holders_is_check_batch_on_random_tables(data: st.DataObject, table: list[NatSession]) -> None:
    batch = data.draw(batch_on(table))
    freed = set(data.draw(st.lists(st.sampled_from([s.key for s in table]), max_size=5))) if table else set()
    owned = {s.translated_address for s in table + batch if s.translated_address != "192.0.2.254"}
    owned = set(data.draw(st.sampled_from([sorted(owned), sorted(owned)[1:]]))) if owned else set()
    existing = {s.key: s for s in table if s.key not in freed}
    want = check_batch(batch, existing, owned)
    assert check_batch_by_holders(batch, holders_of(table, batch), owned, freed) == want
    # A provider may hand over more holders than the batch needs, and its answer is the same.
    assert check_batch_by_holders(batch, {s.reply_key: s.key for s in table}, owned, freed) == want
    # The memory provider's index gives them.
    p = MemoryProvider(owned=owned, table={s.key: s for s in table})
    assert p.check(batch, freed) == want
    if not freed:
        # And apply refuses exactly that (or applies the batch).
        if want:
            with pytest.raises(ApplyError) as ei:
                p.apply(batch)
            assert ei.value.problems == want
            assert p.table == {s.key: s for s in table}
        else:
            p.apply(batch)
            assert p.table == {**{s.key: s for s in table}, **{s.key: s for s in batch}}


@given(table=nat_tables, data=st.data())
@settings(max_examples=200, deadline=None)
def test_the_reply_index_follows_every_write_of_the_table(table: list[NatSession], data: st.DataObject) -> None:
    t = SessionTable({s.key: s for s in table})
    for _ in range(data.draw(st.integers(0, 8))):
        op = data.draw(st.sampled_from(["set", "pop", "del", "update", "setdefault", "popitem", "clear"]))
        if op in ("set", "setdefault", "update"):
            s = data.draw(st.sampled_from(table)) if table and data.draw(st.booleans()) else data.draw(any_session())
            s = dataclasses.replace(s, translated_port=data.draw(st.integers(0, 65535))) if data.draw(st.booleans()) else s
            {"set": lambda: t.__setitem__(s.key, s), "setdefault": lambda: t.setdefault(s.key, s), "update": lambda: t.update({s.key: s})}[op]()
        elif op in ("pop", "del") and t:
            k = data.draw(st.sampled_from(sorted(t, key=repr)))
            t.pop(k) if op == "pop" else t.__delitem__(k)
        elif op == "popitem" and t:
            t.popitem()
        elif op == "clear":
            t.clear()
    want: dict = {}
    for k, s in t.items():
        want.setdefault(s.reply_key, {})[k] = None
    assert {r: set(ks) for r, ks in t.holders.items()} == {r: set(ks) for r, ks in want.items()}


def test_memory_lookup_reads_only_the_keys_asked() -> None:
    p = MemoryProvider(owned={PUB})
    p.apply([s(1000), s(1001, tport=20001)])
    missing = s(7).key
    assert p.lookup([s(1001).key, missing, s(1000).key, s(1001).key]) == [s(1001, tport=20001), s(1000)]


def test_handshake_states_are_written_as_established_by_the_node():
    """What a migration writes was read a moment ago on another node: the node writes handshakes as ESTABLISHED."""
    from dataclasses import replace

    from natmig.agent.provider import as_written

    base = NatSession("TCP", "10.0.0.2", 4000, "198.51.100.7", 80, "203.0.113.1", 20001, "ESTABLISHED", 300)
    table = [replace(base, src_port=4000 + i, translated_port=20001 + i, tcp_state=st, timeout=100 + i)
             for i, st in enumerate(["SYN_SENT", "SYN_RECV", "SYN_SENT2", "FIN_WAIT", "ESTABLISHED"])]
    udp = replace(base, protocol="UDP", tcp_state=None, src_port=5000)
    out = as_written([*table, udp])
    assert [s.tcp_state for s in out] == ["ESTABLISHED", "ESTABLISHED", "ESTABLISHED", "FIN_WAIT", "ESTABLISHED", None]
    assert [s.timeout for s in out[:5]] == [100, 101, 102, 103, 104]
    quiet = [table[3], udp]
    assert as_written(quiet) is quiet  # nothing to change: the batch itself, no copy
    # The conntrack provider writes through it (tests/functional/test_conntrack_provider.py); the
    # memory provider is a plain store of what it is given.
