"""The memory datastores of a state agent (agent.statestore): edit operations, unique, candidate, locks, confirmed commit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from natmig.agent.datastore import DatastoreError
from natmig.agent.stateprovider import Change, MemoryStateProvider
from natmig.agent.statestore import StateStore
from natmig.statemodel import load_module
from natmig.wire.state import Config, Edit

from .test_statemodel import LB, NC, binding, config

BINDING = load_module(LB).list("binding")


def store() -> StateStore:
    return StateStore(load_module(LB))


def cfg(s: StateStore, *entries: str) -> Config:
    return s.wire.decode(config(*entries))


def keys(s: StateStore, source: str = "running") -> set[tuple]:
    tables, _ = s.read(source)
    return set(tables[BINDING])


def with_op(entry: str, op: str) -> str:
    return entry.replace("<binding ", f'<binding xmlns:nc="{NC}" nc:operation="{op}" ', 1)


def test_merge_create_replace_delete_remove() -> None:
    s = store()
    s.edit("running", cfg(s, binding("192.0.2.1", 1), binding("192.0.2.2", 2, snat=5002)), sid=1)
    assert keys(s) == {("192.0.2.1", 1), ("192.0.2.2", 2)}
    # merge keeps the leaves not named
    s.edit("running", cfg(s, f'<binding xmlns="{BINDING.namespace}"><client-address>192.0.2.1</client-address><client-port>1</client-port><idle-timeout>9</idle-timeout></binding>'), sid=1)
    tables, _ = s.read("running")
    assert tables[BINDING][("192.0.2.1", 1)] == ("192.0.2.1", 1, "198.51.100.10", 80, 5000, 9)
    with pytest.raises(DatastoreError, match="data-exists"):
        s.edit("running", cfg(s, with_op(binding("192.0.2.1", 1), "create")), sid=1)
    with pytest.raises(DatastoreError, match="data-missing"):
        s.edit("running", cfg(s, with_op(binding("192.0.2.9", 9), "delete")), sid=1)
    s.edit("running", cfg(s, with_op(binding("192.0.2.9", 9), "remove"), with_op(binding("192.0.2.2", 2), "delete")), sid=1)
    assert keys(s) == {("192.0.2.1", 1)}
    # default-operation replace: what is not in the config goes
    s.edit("running", cfg(s, binding("192.0.2.3", 3, snat=7)), sid=1, default_operation="replace")
    assert keys(s) == {("192.0.2.3", 3)}


def test_a_unique_violation_refuses_the_whole_edit() -> None:
    s = store()
    s.edit("running", cfg(s, binding("192.0.2.1", 1)), sid=1)
    with pytest.raises(DatastoreError) as e:
        s.edit("running", cfg(s, binding("192.0.2.5", 5, snat=6000), binding("192.0.2.2", 2)), sid=1)
    [p] = e.value.problems
    assert (p.tag, p.app_tag, p.path) == ("operation-failed", "data-not-unique", "binding[192.0.2.2 2]")
    assert keys(s) == {("192.0.2.1", 1)}  # the valid entry of the refused edit is not there either
    # moving the holder away in the same edit is fine: the constraint binds the result
    s.edit("running", cfg(s, binding("192.0.2.1", 1, snat=5999), binding("192.0.2.2", 2)), sid=1)
    assert keys(s) == {("192.0.2.1", 1), ("192.0.2.2", 2)}


def test_candidate_commit_and_discard() -> None:
    s = store()
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1)), sid=1)
    assert keys(s) == set() and keys(s, "candidate") == {("192.0.2.1", 1)}
    with pytest.raises(DatastoreError, match="uncommitted changes"):
        s.lock("candidate", 2)
    s.discard(1)
    assert keys(s, "candidate") == set()
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1)), sid=1)
    plan = s.commit(1)
    assert len(plan.upserts) == 1 and keys(s) == {("192.0.2.1", 1)}


def test_locks_name_their_holder_and_end_with_the_session() -> None:
    s = store()
    s.describe = lambda sid: f"session {sid} (ops@192.0.2.254)"
    s.lock("running", 1)
    with pytest.raises(DatastoreError, match=r"running is locked by session 1 \(ops@192.0.2.254\)"):
        s.lock("running", 2)
    with pytest.raises(DatastoreError, match="in-use"):
        s.edit("running", cfg(s, binding("192.0.2.1", 1)), sid=2)
    s.lock("candidate", 1)
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1)), sid=1)
    s.release_session(1)
    assert s.lock_holder("running") is None and keys(s, "candidate") == set()


def test_confirmed_commit_rolls_back_on_timeout_and_confirms_by_persist_id() -> None:
    s = store()
    s.edit("running", cfg(s, binding("192.0.2.1", 1)), sid=1)
    s.edit("candidate", cfg(s, binding("192.0.2.2", 2, snat=1)), sid=1)
    s.commit(1, confirmed=True, timeout=1, persist="tok")
    assert keys(s) == {("192.0.2.1", 1), ("192.0.2.2", 2)}
    time.sleep(1.5)
    assert keys(s) == {("192.0.2.1", 1)}  # rolled back by itself
    s.edit("candidate", cfg(s, binding("192.0.2.2", 2, snat=1)), sid=1)
    s.commit(1, confirmed=True, timeout=1, persist="tok")
    with pytest.raises(DatastoreError, match="does not match"):
        s.commit(2, persist_id="other")
    s.commit(2, persist_id="tok")  # another session confirms with the token
    time.sleep(1.5)
    assert keys(s) == {("192.0.2.1", 1), ("192.0.2.2", 2)}


def test_an_unpersisted_confirmed_commit_ends_with_its_session_and_cancel_undoes() -> None:
    s = store()
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1)), sid=1)
    s.commit(1, confirmed=True, timeout=60)
    with pytest.raises(DatastoreError, match="awaits confirmation"):
        s.edit("running", cfg(s, binding("192.0.2.2", 2, snat=2)), sid=2)
    s.release_session(1)
    assert keys(s) == set()
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1)), sid=3)
    s.commit(3, confirmed=True, timeout=60, persist="p")
    s.cancel_commit(4, persist_id="p")
    assert keys(s) == set()
    with pytest.raises(DatastoreError, match="no confirmed commit is pending"):
        s.cancel_commit(4, persist_id="p")


def test_a_follow_up_with_persist_id_alone_keeps_the_series_token_and_outlives_its_session() -> None:
    s = store()
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1)), sid=1)
    s.commit(1, confirmed=True, timeout=60, persist="t")
    s.edit("candidate", cfg(s, binding("192.0.2.2", 2, snat=2)), sid=1)
    s.commit(1, confirmed=True, timeout=60, persist_id="t")  # a follow-up as the controller sends it (no <persist>)
    s.release_session(1)
    assert keys(s) == {("192.0.2.1", 1), ("192.0.2.2", 2)}  # still pending: the session's end did not roll it back
    s.cancel_commit(2, persist_id="t")  # another session, by the series' token (natmig recover)
    assert keys(s) == set()


def test_changes_of_running_are_reported_once_each() -> None:
    s = store()
    seen: list[tuple[str, tuple]] = []
    s.on_change = lambda lst, ev, e: seen.append((ev, lst.key_of(e)))
    s.edit("running", cfg(s, binding("192.0.2.1", 1)), sid=1)
    s.edit("running", cfg(s, with_op(binding("192.0.2.1", 1), "delete")), sid=1)
    assert seen == [("created", ("192.0.2.1", 1)), ("deleted", ("192.0.2.1", 1))]


def test_statistics_are_the_lists_digests() -> None:
    s = store()
    s.edit("running", cfg(s, binding("192.0.2.1", 1)), sid=1)
    stats = dict((n, (c, d)) for n, c, d in s.statistics())
    tables, _ = s.read("running")
    assert stats["lb-binding:binding"] == (1, BINDING.digest(tables[BINDING].values()))
    assert stats["lb-binding:backend"] == (0, "0000000000000000")


def test_admission_is_state_control(tmp_path: Path) -> None:
    s = store()
    s.edit("candidate", s.wire.decode(config('<state-control xmlns="urn:natmig:yang:natmig-state"><admit-new>false</admit-new></state-control>')), sid=1)
    assert s.admission() is True
    s.commit(1)
    assert s.admission() is False


def test_a_rollback_undoes_what_the_commits_changed_and_keeps_what_else_wrote_running() -> None:
    from natmig.agent.stateprovider import Change

    s = store()
    s.edit("running", cfg(s, binding("192.0.2.1", 1, snat=1)), sid=1)
    s.edit("candidate", cfg(s, binding("192.0.2.1", 1, snat=11), binding("192.0.2.2", 2, snat=2)), sid=1)
    s.commit(1, confirmed=True, timeout=60, persist="t")
    e3 = s.wire.complete(BINDING, {"client-address": "192.0.2.3", "client-port": 3, "backend-address": "198.51.100.10", "backend-port": 80, "snat-port": 3})
    s.provider.apply({BINDING: Change([e3])})  # what traffic creates on a live table meanwhile
    s.edit("candidate", cfg(s, with_op(binding("192.0.2.1", 1), "delete")), sid=1)
    s.commit(1, confirmed=True, timeout=60, persist="t", persist_id="t")  # extends the series
    assert keys(s) == {("192.0.2.2", 2), ("192.0.2.3", 3)}
    s.cancel_commit(2, persist_id="t")
    tables, _ = s.read("running")
    assert set(tables[BINDING]) == {("192.0.2.1", 1), ("192.0.2.3", 3)}
    assert tables[BINDING][("192.0.2.1", 1)][4] == 1  # its value before the first commit of the series


def test_the_provider_refuses_a_change_whole() -> None:
    from natmig.agent.stateprovider import Change, StateRefused

    s = store()
    e1 = s.wire.complete(BINDING, {"client-address": "192.0.2.1", "client-port": 1, "backend-address": "198.51.100.10", "backend-port": 80, "snat-port": 5})
    e2 = s.wire.complete(BINDING, {"client-address": "192.0.2.2", "client-port": 2, "backend-address": "198.51.100.10", "backend-port": 80, "snat-port": 5})
    with pytest.raises(StateRefused, match=r"binding\[192.0.2.2 2\]"):
        s.provider.apply({BINDING: Change([e1, e2])})
    assert keys(s) == set()


class _Counting(MemoryStateProvider):
    """A memory provider that counts whole reads and keys looked up (a kernel table's costs)."""

    def __init__(self, module) -> None:  # type: ignore[no-untyped-def]
        super().__init__(module)
        self.reads = 0
        self.looked_up = 0

    def read(self):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().read()

    def read_lists(self, lists):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().read_lists(lists)

    def lookup(self, lst, keys):  # type: ignore[no-untyped-def]
        self.looked_up += len(keys)
        return super().lookup(lst, keys)


def test_writing_k_entries_reads_k_keys_not_the_table() -> None:
    from natmig.schema import YANG_DIR

    module = load_module(YANG_DIR / "fw-state.yang")  # no `unique`: nothing binds the whole list
    p = _Counting(module)
    s = StateStore(module, p)
    sess = module.list("session")
    big = [("TCP", "10.0.0.2", 1024 + i, "203.0.113.2", 80, "ESTABLISHED", 60, True, 0) for i in range(5000)]
    p.apply({sess: Change(big)})

    def edit(i: int) -> Config:
        return Config([Edit(sess, None, ("UDP", "10.0.0.3", i, "203.0.113.2", 53), {"protocol": "UDP", "src-address": "10.0.0.3",
                       "src-port": i, "dst-address": "203.0.113.2", "dst-port": 53})], None)

    p.reads = p.looked_up = 0
    s.edit("running", edit(1), sid=1)
    s.edit("candidate", edit(2), sid=1)
    s.edit("candidate", edit(3), sid=1)
    s.commit(1, confirmed=True, timeout=60)
    s.commit(1)
    assert p.reads == 0 and p.looked_up == 5  # one key per edit, two for the confirmed commit's undo
    assert len(p.read()[sess]) == 5003
    # Admission alone reads no list.
    p.reads = 0
    assert s.read("running", [])[1] is True and p.reads == 0
