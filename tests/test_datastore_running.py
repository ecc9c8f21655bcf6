"""A running edit of K entries reads K entries: the datastore over a provider that counts its reads.

Whole-table reads (list, batches) are counted; lookups and checks record
what they were asked.  The same requests give the same errors and leave the
same table as a datastore that plans against the whole table (the way every
edit was planned before), on random tables (hypothesis).
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Iterable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.agent.datastore import Datastore, DatastoreError, EditRequest
from natmig.agent.provider import ApplyError, BeforeCreate, MemoryProvider, SessionProvider, Snapshot, check_batch
from natmig.codec import EditEntry, default_codec
from natmig.model import FIELD_NAMES, NatSession, SessionKey

from .strategies import sessions as any_session

PUB = "203.0.113.1"
CODEC = default_codec()


class Counting(MemoryProvider):
    """MemoryProvider that counts whole-table reads and records what it was asked by key."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.table_reads = 0
        self.looked_up: list[list[SessionKey]] = []
        self.checked: list[tuple[list[SessionKey], set[SessionKey]]] = []

    def list(self) -> Snapshot:
        self.table_reads += 1
        return super().list()

    def batches(self) -> Iterator[list[NatSession]]:
        self.table_reads += 1
        yield super().list().sessions

    def lookup(self, keys: Iterable[SessionKey]) -> list[NatSession]:
        keys = list(keys)
        self.looked_up.append(keys)
        return super().lookup(keys)

    def check(self, sessions: Sequence[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        self.checked.append(([s.key for s in sessions], set(freed)))
        return super().check(sessions, freed)


class WholeTable(MemoryProvider):
    """The reference: every read is the whole table, every check check_batch against it (as before)."""

    def lookup(self, keys: Iterable[SessionKey]) -> list[NatSession]:
        return self.list().sessions  # more than asked: the planner must only use what it names

    def check(self, sessions: Sequence[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        return SessionProvider.check(self, sessions, freed)

    def apply(self, sessions: Sequence[NatSession], before_create: BeforeCreate | None = None) -> None:
        with self._lock:
            problems = check_batch(sessions, dict(self.table), self.owned)
            if problems:
                raise ApplyError(problems)
            if before_create is not None:
                before_create([s.key for s in sessions if s.key not in self.table])
            self.table.update({s.key: s for s in sessions})


def S(i: int, tport: int | None = None, **kw: object) -> NatSession:
    return NatSession("TCP", f"10.0.{i // 250}.{i % 250}", 1024 + i, "198.51.100.1", 443, str(kw.pop("pub", PUB)),
                      20000 + i if tport is None else tport, "ESTABLISHED", 300, **kw)  # type: ignore[arg-type]


def E(s: NatSession, op: str | None = None) -> EditEntry:
    if op in ("delete", "remove"):
        return EditEntry(op, s.key, dict(zip(("protocol", "src_address", "src_port", "dst_address", "dst_port"), s.key)))
    return EditEntry(op, s.key, {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None})


N = 1000


@pytest.fixture
def ds() -> Datastore:
    p = Counting(owned={PUB}, table={S(i).key: S(i) for i in range(N)})
    return Datastore(p, CODEC)


def provider(ds: Datastore) -> Counting:
    assert isinstance(ds.provider, Counting)
    return ds.provider


def test_a_catch_up_of_creates_and_deletes_reads_only_its_entries(ds: Datastore) -> None:
    new = [S(N + i) for i in range(100)]
    gone = [S(i) for i in range(0, 500, 10)]
    plan = ds.edit("running", EditRequest([E(s, "create") for s in new] + [E(s, "delete") for s in gone]), sid=1)
    p = provider(ds)
    assert p.table_reads == 0
    assert p.looked_up == [[s.key for s in new + gone]]
    # Deletes come first: the new entries are checked against the table without them.
    assert p.checked == [([s.key for s in new], {s.key for s in gone})]
    assert len(plan.upserts) == 100 and len(plan.deletes) == 50
    assert len(p.table) == N + 50 and all(s.key in p.table for s in new) and not any(s.key in p.table for s in gone)


@pytest.mark.parametrize("op", ["merge", "replace", "create", None])
def test_plain_writes_are_checked_once_by_the_provider(ds: Datastore, op: str | None) -> None:
    ds.edit("running", EditRequest([E(S(N + i), op) for i in range(10)] + [E(S(5, mark=3), "merge")]), sid=1)
    p = provider(ds)
    assert p.table_reads == 0 and p.checked == [] and len(p.looked_up) == 1
    assert p.table[S(5).key].mark == 3


def test_errors_are_the_same_and_nothing_changes(ds: Datastore) -> None:
    p = provider(ds)
    before = dict(p.table)

    def refused(*entries: EditEntry, **kw: str) -> DatastoreError:
        with pytest.raises(DatastoreError) as e:
            ds.edit("running", EditRequest(list(entries)), sid=1, **kw)
        assert p.table == before
        return e.value

    new = S(N + 1)
    assert [x.tag for x in refused(E(new, "create"), E(S(3), "create")).problems] == ["data-exists"]
    assert [x.tag for x in refused(E(new, "create"), E(S(N + 2), "delete")).problems] == ["data-missing"]
    # A public port held by a session the edit does not name: refused by the
    # provider's apply (plain writes), by its check (with deletes, test-only,
    # continue-on-error); data-not-unique naming the entry either way.
    clash = S(N + 3, tport=20007)
    for kw in ({}, {"test_option": "test-only"}, {"error_option": "continue-on-error"}):
        (pr,) = refused(E(clash), **kw).problems
        assert (pr.tag, pr.app_tag, pr.leaf) == ("operation-failed", "data-not-unique", "translated_port")
        assert pr.path == f"nat-session[TCP {clash.src_address} {clash.src_port} 198.51.100.1 443]"
        assert "already used by nat-session[TCP 10.0.0.7 1031 198.51.100.1 443]" in pr.message
    (pr,) = refused(E(new), E(clash)).problems  # the good entry is not written either
    assert pr.app_tag == "data-not-unique"
    (pr,) = refused(E(S(9), "delete"), E(clash)).problems
    assert pr.app_tag == "data-not-unique"
    # ... unless the edit deletes that session first.
    ds.edit("running", EditRequest([E(S(7), "delete"), E(clash)]), sid=1)
    assert p.table[clash.key].translated_port == 20007
    before = dict(p.table)
    (pr,) = refused(E(new), E(S(N + 4, pub="192.0.2.9"))).problems
    assert (pr.tag, pr.leaf) == ("invalid-value", "translated_address")
    assert p.table_reads == 0


def test_continue_on_error_applies_the_rest_reading_no_table(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(N + 1)), E(S(N + 2, tport=20003))]), sid=1, error_option="continue-on-error")
    assert [x.app_tag for x in e.value.problems] == ["data-not-unique"]
    p = provider(ds)
    assert S(N + 1).key in p.table and S(N + 2).key not in p.table and p.table_reads == 0


def test_the_whole_list_is_read_once_for_an_operation_on_the_list(ds: Datastore) -> None:
    p = provider(ds)
    ds.edit("running", EditRequest(list_operation="remove"), sid=1)
    assert p.table == {} and p.table_reads == 1
    ds.edit("running", EditRequest([E(S(1))]), sid=1, default_operation="replace")
    assert list(p.table) == [S(1).key] and p.table_reads == 2


def test_nat_control_is_not_read_by_an_edit_of_sessions(ds: Datastore) -> None:
    calls = []
    ds.provider.admission = lambda: calls.append(1) or True  # type: ignore[method-assign]
    ds.edit("running", EditRequest([E(S(N + 1))]), sid=1)
    assert calls == []


def test_a_commit_reads_only_what_it_deletes(ds: Datastore) -> None:
    p = provider(ds)
    ds.edit("candidate", EditRequest([E(S(N + 1), "create"), E(S(4), "delete")]), sid=1)
    reads = p.table_reads  # the candidate's own copy
    p.looked_up.clear()
    ds.commit(1, confirmed=True, timeout=60)
    assert p.table_reads == reads and p.looked_up == [[S(4).key]]
    pending = ds.pending_commit()
    assert pending is not None and (pending.created, pending.restored) == (1, 1)
    ds.cancel_commit(1)
    assert S(4).key in p.table and S(N + 1).key not in p.table


# -- random tables and edits: the same outcome as planning against the whole table --

nat_tables = st.lists(any_session(), max_size=15, unique_by=(lambda x: x.key, lambda x: x.reply_key))
OPS = ["merge", "replace", "create", "delete", "remove", "none", None]


@st.composite
def edits(draw: st.DrawFn, table: list[NatSession]) -> list[EditEntry]:
    out = []
    for _ in range(draw(st.integers(1, 8))):
        if table and draw(st.booleans()):
            t = draw(st.sampled_from(table))
            s = draw(st.sampled_from([t, dataclasses.replace(t, translated_port=draw(st.integers(1, 65535))), dataclasses.replace(t, mark=5)]))
        else:
            s = draw(any_session())
            if table and draw(st.booleans()):  # on the reply tuple of a session of the table
                t = draw(st.sampled_from(table))
                s = dataclasses.replace(s, protocol=t.protocol, dst_address=t.dst_address, dst_port=t.dst_port,
                                        translated_address=t.translated_address, translated_port=t.translated_port,
                                        tcp_state=t.tcp_state)
        out.append(E(s, draw(st.sampled_from(OPS))))
    return out


def outcome(provider: MemoryProvider, entries: list[EditEntry], **kw: str) -> tuple:
    ds = Datastore(provider, CODEC)
    try:
        plan = ds.edit("running", EditRequest([dataclasses.replace(e, values=dict(e.values)) for e in entries]), sid=1, **kw)
        result: object = (sorted(plan.upserts), sorted(plan.deletes))
    except DatastoreError as e:
        result = [(p.tag, p.path, p.leaf, p.app_tag, p.message) for p in e.problems]
    return result, dict(provider.table)


@given(table=nat_tables, data=st.data())
@settings(max_examples=300, deadline=None)
def test_edits_of_random_tables_end_as_when_planned_against_the_whole_table(table: list[NatSession], data: st.DataObject) -> None:
    entries = data.draw(edits(table))
    kw = {
        "default_operation": data.draw(st.sampled_from(["merge", "none"])),
        "test_option": data.draw(st.sampled_from(["test-then-set", "test-only"])),
        "error_option": data.draw(st.sampled_from(["stop-on-error", "continue-on-error"])),
    }
    owned = {s.translated_address for s in table} | {e.values.get("translated_address") for e in entries if data.draw(st.booleans())}
    owned.discard(None)
    fast = Counting(owned=set(owned), table={s.key: s for s in table})
    assert outcome(fast, entries, **kw) == outcome(WholeTable(owned=set(owned), table={s.key: s for s in table}), entries, **kw)
    assert fast.table_reads == 0
