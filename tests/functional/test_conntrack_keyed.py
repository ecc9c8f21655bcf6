"""What a write of K sessions reads, on the real kernel: by key against by a dump of the table.

ConntrackProvider reads a batch's entries by key (a ctnetlink GET each)
unless the batch is about as large as the table; both ways must give the
same answers on one real table -- lookup, check (who holds a reply tuple:
sessions of every protocol and entries that are not sessions) -- and an
apply refused by the kernel on the by-key path must name what the check
names and leave the table as it was.  Then the datastore on a 20k table:
a catch-up's creates and deletes start no ``conntrack -L``.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from natmig import netns
from natmig.agent import ctbulk
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.datastore import Datastore, DatastoreError, EditRequest
from natmig.agent.provider import ApplyError
from natmig.codec import EditEntry, default_codec
from natmig.model import FIELD_NAMES, NatSession

from .helpers_natnode import PUBLIC_IP, SERVER_IP, TwoNatNet, built
from .test_conntrack_provider import comparable, synthetic

pytestmark = pytest.mark.root

# Entries that are not sessions but hold what a session's reply tuple needs
# (see test_reply_tuple_held_by_an_untranslated_connection_is_refused_not_remapped).
HOLDERS = [
    ["-p", "tcp", "-s", "198.51.100.1", "-d", PUBLIC_IP, "--sport", "80", "--dport", "45005", "--state", "ESTABLISHED"],
    ["-p", "udp", "-s", PUBLIC_IP, "-d", "198.51.100.2", "--sport", "45006", "--dport", "53", "-u", "SEEN_REPLY"],
    ["-p", "icmp", "-s", PUBLIC_IP, "-d", "198.51.100.4", "--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "45008"],
]
#: A session each of them would clash with.
HELD = [
    NatSession("TCP", "10.0.0.9", 1234, "198.51.100.1", 80, PUBLIC_IP, 45005, "ESTABLISHED", 100),
    NatSession("UDP", "10.0.0.9", 1235, "198.51.100.2", 53, PUBLIC_IP, 45006, None, 100),
    NatSession("ICMP", "10.0.0.9", 7, "198.51.100.4", 0, PUBLIC_IP, 45008, None, 100),
]


@pytest.fixture
def net():
    """Client, server, switch and NAT node a only, always torn down."""
    with built("nmky", ("a",)) as n:
        yield n


def provider(net: TwoNatNet) -> ConntrackProvider:
    node = net.nats["a"]
    return ConntrackProvider(node.name, node=node)


def fill(a: ConntrackProvider, n: int) -> list[NatSession]:
    for args in HOLDERS:
        netns.run(["conntrack", "-I", *args, "-t", "300"], a.netns)
    table = synthetic(n)
    a.apply(table)
    return table


def by(monkeypatch: pytest.MonkeyPatch, key: bool) -> None:
    monkeypatch.setattr(ConntrackProvider, "_reads_by_key", lambda self, k: key)


def touching(rng: random.Random, table: list[NatSession], k: int) -> list[NatSession]:
    """A batch touching ``table`` in every way check_batch distinguishes, and the entries that are not sessions."""
    out: list[NatSession] = []
    for i in range(k):
        t = rng.choice(table)
        kind = rng.choice(["same", "moved", "takes-its-reply", "held", "fresh", "twice", "foreign"])
        if kind == "same":
            s = t
        elif kind == "moved":
            s = dataclasses.replace(t, translated_port=50000 + i)
        elif kind == "takes-its-reply":
            s = dataclasses.replace(t, src_address="10.0.0.250", src_port=100 + i if t.protocol != "ICMP" else 60000 + i)
        elif kind == "held":
            s = dataclasses.replace(rng.choice(HELD), src_port=2000 + i)
        elif kind == "twice" and out:
            s = rng.choice(out)
        elif kind == "foreign":
            s = dataclasses.replace(t, src_address="10.0.0.251", translated_address="203.0.113.77")
        else:
            s = NatSession("UDP", "10.0.0.252", 3000 + i, SERVER_IP, 53, PUBLIC_IP, 51000 + i)
        out.append(s)
    return out


def test_reads_by_key_and_by_dump_give_the_same_answers(net: TwoNatNet, monkeypatch: pytest.MonkeyPatch) -> None:
    a = provider(net)
    try:
        table = fill(a, 600)
        assert a._reader.count() == int(netns.run(["conntrack", "-C"], a.netns).stdout)
        rng = random.Random(7)
        keys = [s.key for s in rng.sample(table, 50)] + [
            ("UDP", "10.0.0.99", 1, SERVER_IP, 1),  # no such entry
            ("TCP", "198.51.100.1", 80, PUBLIC_IP, 45005),  # an untranslated entry's key
            (table[0].protocol, table[0].dst_address, table[0].dst_port, PUBLIC_IP, table[0].translated_port),  # a reply tuple
            ("TCP", "fe80::1", 1, SERVER_IP, 1),  # not one the node can hold
        ]
        by(monkeypatch, True)
        keyed = a.lookup(keys)
        by(monkeypatch, False)
        assert comparable(a.lookup(keys)) == comparable(keyed) and len(keyed) == 50
        seen: set[str] = set()
        for round_ in range(12):
            batch = touching(rng, table, rng.randint(1, 30))
            freed = {s.key for s in rng.sample(table, 3)} if round_ % 2 else set()
            by(monkeypatch, False)
            dumped = a.check(batch, freed)
            by(monkeypatch, True)
            assert a.check(batch, freed) == dumped, round_
            seen |= {w for why in dumped.values() for w in ("already used by", "does not translate", "twice", "not an address") if w in why}
        assert seen == {"already used by", "does not translate", "twice", "not an address"}
    finally:
        a.close()


def test_a_clash_left_to_the_kernel_is_named_as_the_check_names_it_and_rolled_back(net: TwoNatNet, monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch larger than two netlink batches of creates, by key onto a
    # table: the entry on another session's reply tuple sits in the third.
    a = provider(net)
    try:
        table = fill(a, 3000)
        before = comparable(a.list().sessions)
        fresh = [NatSession("TCP", "10.0.0.240", 1000 + i, "198.51.100.9", 443, PUBLIC_IP, 30000 + i, "ESTABLISHED", 300)
                 for i in range(ctbulk.CREATE_BATCH * 3)]
        t = next(s for s in table if s.protocol == "ICMP")
        clash = dataclasses.replace(t, src_address="10.0.0.250", src_port=65000)
        at = ctbulk.CREATE_BATCH * 2 + 5
        batch = [*fresh[:at], clash, *fresh[at:], HELD[0]]
        by(monkeypatch, True)
        with pytest.raises(ApplyError) as ei:
            a.apply(batch)
        by(monkeypatch, False)
        assert ei.value.problems == a.check(batch)  # every offender, as the whole table's check names them
        assert set(ei.value.problems) == {clash.key, HELD[0].key}
        assert ei.value.problems[clash.key].endswith(f"already used by nat-session[ICMP {t.src_address} {t.src_port} {t.dst_address} 0]")
        assert "does not translate" in ei.value.problems[HELD[0].key]
        assert comparable(a.list().sessions) == before
        # Without the names (a holder gone again by then), the kernel's own refusal.
        by(monkeypatch, True)
        monkeypatch.setattr(ConntrackProvider, "_holders", lambda self, batch: ({}, {}))
        with pytest.raises(ApplyError) as ei:
            a.apply(batch[:-1])
        assert list(ei.value.problems) == [clash.key]
        assert ei.value.problems[clash.key].startswith("kernel refused to create it: EEXIST")
        assert comparable(a.list().sessions) == before
        monkeypatch.undo()
        # A key moved onto a taken reply tuple: checked first, nothing written (its old session keeps its counters).
        moved = dataclasses.replace(table[1], translated_port=table[4].translated_port, dst_address=table[4].dst_address,
                                    dst_port=table[4].dst_port) if table[1].protocol == table[4].protocol else None
        assert moved is not None
        by(monkeypatch, True)
        with pytest.raises(ApplyError) as ei:
            a.apply([fresh[0], moved])
        assert list(ei.value.problems) == [moved.key]
        assert comparable(a.list().sessions) == before
        # The same batch without them goes in whole, by key.
        a.apply(fresh)
        assert len(a.list().sessions) == len(before) + len(fresh)
    finally:
        a.close()


def test_delete_by_key_and_all_leave_what_is_not_a_session(net: TwoNatNet) -> None:
    a = provider(net)
    try:
        table = fill(a, 2000)
        entries = int(netns.run(["conntrack", "-C"], a.netns).stdout)
        assert a.delete([s.key for s in table[:500]] + [("UDP", "10.0.0.99", 1, SERVER_IP, 1)]) == 500
        assert int(netns.run(["conntrack", "-C"], a.netns).stdout) == entries - 500
        assert a.delete() == 1500
        assert a.list().sessions == [] and a.list().untranslated == len(HOLDERS)
    finally:
        a.close()


def entry(s: NatSession, op: str) -> EditEntry:
    if op == "delete":
        return EditEntry(op, s.key, dict(zip(("protocol", "src_address", "src_port", "dst_address", "dst_port"), s.key)))
    return EditEntry(op, s.key, {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None})


def test_a_running_edit_on_20k_sessions_starts_no_table_dump(net: TwoNatNet, monkeypatch: pytest.MonkeyPatch) -> None:
    a = provider(net)
    ds = Datastore(a, default_codec())
    try:
        table = fill(a, 20_000)
        dumps: list[int] = []
        start = ConntrackProvider._start_read
        monkeypatch.setattr(ConntrackProvider, "_start_read", lambda self: dumps.append(1) or start(self))
        new = [NatSession("UDP", "10.0.0.241", 1000 + i, SERVER_IP, 53, PUBLIC_IP, 50000 + i, None, 300) for i in range(100)]
        gone = table[::400]
        plan = ds.edit("running", EditRequest([entry(s, "create") for s in new] + [entry(s, "delete") for s in gone]), sid=1)
        assert (len(plan.upserts), len(plan.deletes), dumps) == (100, 50, [])
        # A public port held by a session the edit does not name: data-not-unique, nothing changed.
        t = table[12_345]
        clash = dataclasses.replace(t, src_address="10.0.0.242", src_port=7 if t.protocol == "ICMP" else 7000)
        monkeypatch.undo()
        before = comparable(a.list().sessions)
        monkeypatch.setattr(ConntrackProvider, "_start_read", lambda self: dumps.append(1) or start(self))
        for extra in ([entry(new[0], "delete")], []):  # checked before the delete; refused by the kernel
            with pytest.raises(DatastoreError) as e:
                ds.edit("running", EditRequest([entry(NatSession("UDP", "10.0.0.243", 1, SERVER_IP, 53, PUBLIC_IP, 60000), "create"),
                                                entry(clash, "create"), *extra]), sid=1)
            (p,) = e.value.problems
            assert (p.tag, p.app_tag, p.leaf) == ("operation-failed", "data-not-unique", "translated_port")
            assert p.path == f"nat-session[{' '.join(map(str, clash.key))}]" and "already used by" in p.message
        assert dumps == []
        monkeypatch.undo()
        assert comparable(a.list().sessions) == before
        got = set(before)
        assert {s.key for s in new} <= got and not got & {s.key for s in gone} and len(got) == 20_000 + 50
    finally:
        a.close()


def test_a_copy_holding_a_closed_connection_and_the_live_one_that_took_its_port_commits_the_live_one(net: TwoNatNet) -> None:
    # A source read while it served: between the two reads its kernel gave
    # the closed connection's public port to a new connection (and killed it).
    a = provider(net)
    ds = Datastore(a, default_codec())
    try:
        table = fill(a, 300)
        closed = NatSession("TCP", "10.0.0.230", 4000, SERVER_IP, 443, PUBLIC_IP, 29500, "TIME_WAIT", 100)
        live = NatSession("TCP", "10.0.0.231", 4001, SERVER_IP, 443, PUBLIC_IP, 29500, "ESTABLISHED", 300)
        other = NatSession("TCP", "10.0.0.232", 4002, SERVER_IP, 443, PUBLIC_IP, 29501, "ESTABLISHED", 300)
        ds.edit("candidate", EditRequest([entry(closed, "merge"), entry(other, "merge")]), sid=1)   # one slice
        ds.edit("candidate", EditRequest([entry(live, "merge")]), sid=1)                          # a later one
        ds.commit(sid=1)
        got = {s.key: s for s in a.list().sessions}
        assert live.key in got and got[live.key].translated_port == 29500 and other.key in got
        assert closed.key not in got and len(got) == 300 + 2
        # Two live connections on one public port are still a conflict, refused whole.
        with pytest.raises(DatastoreError) as e:
            ds.edit("candidate", EditRequest([entry(dataclasses.replace(live, src_port=4003), "merge")]), sid=1)
        assert "already used by" in e.value.problems[0].message
        assert {s.key for s in a.list().sessions} == set(got) and set(got) >= {s.key for s in table}
    finally:
        a.close()
