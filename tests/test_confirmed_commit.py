"""Confirmed commit (RFC 6241 8.4) over MemoryProvider: rollback as an undo, extension, persist, cancel, journal, restart."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import pytest
from lxml import etree

from natmig.agent.confirmed import Journal, Undo
from natmig.agent.datastore import Datastore, DatastoreError, EditRequest
from natmig.agent.monitoring import SessionRecord
from natmig.agent.provider import ApplyError, MemoryProvider, Snapshot
from natmig.agent.rpc import SessionState, handle_message
from natmig.agent.server import OPTIONAL_CAPABILITIES
from natmig.codec import NETCONF_NS, default_codec
from natmig.errors import ProviderError
from natmig.model import NatSession

from .test_agent_rpc import FakeServer, errors
from .test_datastore import E, S, table


@pytest.fixture
def ds() -> Iterator[Datastore]:
    p = MemoryProvider(owned={"203.0.113.1"})
    p.apply([S(1), S(2), S(3)])
    d = Datastore(p, default_codec())
    yield d
    d.close()


def change_everything(ds: Datastore, sid: int = 1) -> None:
    """In the candidate: create S(9), replace S(2) (new public port), delete S(1), stop admission."""
    ds.edit("candidate", EditRequest([E(S(9)), E(S(2, pub=30002), "replace"), E(S(1), "delete")], control={"admit-new-sessions": False}), sid=sid)


def wait_rolled_back(ds: Datastore, within: float = 3.0) -> float:
    t0 = time.monotonic()
    while ds.pending_commit() is not None:
        assert time.monotonic() - t0 < within, "the confirmed commit was not rolled back in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def refused(fn, *a, **kw) -> DatastoreError:  # noqa: ANN001 - test helper
    with pytest.raises(DatastoreError) as e:
        fn(*a, **kw)
    return e.value


# ------------------------------------------------------------- rollback


def test_timeout_restores_exactly_what_the_commit_changed_and_nothing_else(ds: Datastore) -> None:
    p = ds.provider
    before = table(ds)
    change_everything(ds)
    ds.commit(1, confirmed=True, timeout=1)
    assert S(9).key in p.table and S(1).key not in p.table and p.table[S(2).key].translated_port == 30002 and p.admit is False
    # Traffic while the commit awaits confirmation: one session opens, one closes.
    p.apply([S(20)])
    p.delete([S(3).key])
    time.sleep(0.5)
    assert ds.pending_commit() is not None
    waited = wait_rolled_back(ds)
    assert 0.3 < waited + 0.5 < 2.5
    after = table(ds)
    assert S(9).key not in after  # created: deleted
    assert after[S(2).key] == before[S(2).key]  # replaced: old value back
    assert after[S(1).key] == before[S(1).key]  # deleted: re-created
    assert p.admit is True  # nat-control: old value back
    assert S(20).key in after  # opened by traffic meanwhile: kept
    assert S(3).key not in after  # closed by traffic meanwhile: not resurrected
    assert table(ds, "candidate") == after  # the candidate was reset


def test_a_created_session_gone_meanwhile_is_no_problem(ds: Datastore) -> None:
    ds.edit("candidate", EditRequest([E(S(9)), E(S(10))]), sid=1)
    ds.commit(1, confirmed=True, timeout=600)
    ds.provider.delete([S(9).key])  # closed by traffic
    ds.cancel_commit(1)
    assert set(table(ds)) == {S(1).key, S(2).key, S(3).key}


def test_confirming_commit_keeps_the_changes_and_applies_new_ones(ds: Datastore) -> None:
    change_everything(ds)
    ds.commit(1, confirmed=True, timeout=1)
    ds.edit("candidate", EditRequest([E(S(10))]), sid=1)
    ds.commit(1)  # confirms, and brings S(10)
    assert ds.pending_commit() is None
    time.sleep(1.3)  # past the first timeout: nothing may happen
    got = table(ds)
    assert {S(9).key, S(10).key} <= set(got) and S(1).key not in got and ds.provider.admit is False


def test_extension_keeps_the_rollback_point(ds: Datastore) -> None:
    before = table(ds)
    ds.edit("candidate", EditRequest([E(S(9)), E(S(1), "delete")]), sid=1)
    ds.commit(1, confirmed=True, timeout=1)
    first = ds.pending_commit()
    # The follow-up changes what the first created, re-creates what it deleted
    # (with other values), creates more, and changes admission.
    ds.edit("candidate", EditRequest([E(S(9, pub=30009), "replace"), E(S(1, pub=30001)), E(S(10))], control={"admit-new-sessions": False}), sid=1)
    ds.commit(1, confirmed=True, timeout=3)
    second = ds.pending_commit()
    assert first is not None and second is not None and second.deadline > first.deadline
    time.sleep(1.3)  # past the first timeout: extended, so still there
    assert ds.pending_commit() is not None and S(10).key in ds.provider.table
    ds.cancel_commit(1)
    assert table(ds) == before and ds.provider.admit is True


def test_session_end_without_persist_rolls_back_at_once(ds: Datastore) -> None:
    before = table(ds)
    change_everything(ds)
    ds.lock("running", 1)
    ds.commit(1, confirmed=True)  # default timeout: 600 s
    assert ds.pending_commit() is not None and ds.pending_commit().deadline > time.time() + 590
    ds.release_session(1)  # closed, killed or lost
    assert ds.pending_commit() is None
    assert table(ds) == before and ds.provider.admit is True


def test_session_end_with_persist_keeps_it_for_any_session_with_the_persist_id(ds: Datastore) -> None:
    change_everything(ds)
    ds.commit(1, confirmed=True, timeout=600, persist="tok")
    ds.release_session(1)
    assert ds.pending_commit().persist == "tok"
    e = refused(ds.commit, 2)
    assert e.problems[0].tag == "invalid-value" and "with <persist> is pending" in e.problems[0].message
    assert e.problems[0].info == {"bad-element": "persist-id"}
    e = refused(ds.commit, 2, persist_id="other")
    assert e.problems[0].tag == "invalid-value" and "does not match" in e.problems[0].message
    ds.commit(2, persist_id="tok")
    assert ds.pending_commit() is None and S(9).key in ds.provider.table


def test_persist_follow_up_from_another_session_and_a_new_token(ds: Datastore) -> None:
    before = table(ds)
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    ds.commit(1, confirmed=True, persist="a")
    ds.edit("candidate", EditRequest([E(S(10))]), sid=2)  # edits by others are allowed with persist
    ds.commit(2, confirmed=True, persist_id="a")  # extends; the token stays
    assert ds.pending_commit().persist == "a"
    ds.commit(3, confirmed=True, persist_id="a", persist="b")  # a new token
    refused(ds.cancel_commit, 3, persist_id="a")
    ds.cancel_commit(4, persist_id="b")
    assert table(ds) == before


def test_without_persist_other_sessions_get_in_use_naming_the_owner(ds: Datastore) -> None:
    ds.describe = lambda sid: f"session {sid} (natmig@192.0.2.10, since 08:12:01 UTC)"
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    ds.commit(1, confirmed=True)
    for call in (lambda: ds.commit(2), lambda: ds.commit(2, confirmed=True), lambda: ds.cancel_commit(2),
                 lambda: ds.edit("running", EditRequest([E(S(10))]), sid=2),
                 lambda: ds.edit("candidate", EditRequest([E(S(10))]), sid=2), lambda: ds.discard(2)):
        e = refused(call)
        (pr,) = e.problems
        assert pr.tag == "in-use" and pr.info == {"session-id": "1"}
        assert "session 1 (natmig@192.0.2.10, since 08:12:01 UTC)" in pr.message
    e = refused(ds.commit, 1, persist_id="x")  # the owner, with an id the commit never had
    assert e.problems[0].tag == "invalid-value"
    ds.commit(1)
    ds.edit("running", EditRequest([E(S(10))]), sid=2)  # confirmed: everyone may write again


def test_persist_id_or_cancel_when_nothing_is_pending(ds: Datastore) -> None:
    e = refused(ds.commit, 1, persist_id="x")
    assert e.problems[0].tag == "invalid-value" and "no confirmed commit is pending" in e.problems[0].message
    e = refused(ds.cancel_commit, 1)
    assert e.problems[0].tag == "invalid-value" and "no confirmed commit is pending" in e.problems[0].message
    e = refused(ds.commit, 1, confirmed=True, timeout=0)
    assert e.problems[0].info == {"bad-element": "confirm-timeout"}


def test_cancel_commit_rules(ds: Datastore) -> None:
    before = table(ds)
    change_everything(ds)
    ds.commit(1, confirmed=True, persist="p")
    assert "persist-id" in refused(ds.cancel_commit, 1).problems[0].message
    assert "does not match" in refused(ds.cancel_commit, 2, persist_id="q").problems[0].message
    ds.lock("running", 3)
    assert refused(ds.cancel_commit, 2, persist_id="p").problems[0].tag == "in-use"  # a client's change needs write access
    ds.unlock("running", 3)
    ds.cancel_commit(2, persist_id="p")
    assert table(ds) == before and ds.provider.admit is True and ds.pending_commit() is None


def test_rollback_at_timeout_ignores_the_locks_of_the_issuing_session(ds: Datastore) -> None:
    before = table(ds)
    ds.lock("running", 1)
    ds.lock("candidate", 1)
    change_everything(ds)
    ds.commit(1, confirmed=True, timeout=1, persist="p")
    wait_rolled_back(ds)  # the session still holds both locks
    assert table(ds) == before
    assert ds.lock_holder("running") == 1 and ds.lock_holder("candidate") == 1


class BrokenOnRollback(MemoryProvider):
    """Accepts the commit; then refuses deletes (the first rollback step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.broken = False

    def delete(self, keys=None) -> int:  # noqa: ANN001 - test double
        if self.broken:
            raise ProviderError("netlink: the kernel said no")
        return super().delete(keys)


def test_a_provider_failure_during_rollback_is_logged_and_the_rest_still_done(caplog: pytest.LogCaptureFixture) -> None:
    p = BrokenOnRollback(owned={"203.0.113.1"})
    p.apply([S(1), S(2)])
    ds = Datastore(p, default_codec())
    ds.edit("candidate", EditRequest([E(S(9)), E(S(1), "delete")], control={"admit-new-sessions": False}), sid=1)
    ds.commit(1, confirmed=True, timeout=1)
    p.broken = True
    with caplog.at_level(logging.ERROR):
        wait_rolled_back(ds)
    assert "the kernel said no" in caplog.text
    assert S(1).key in p.table and p.admit is True  # restore and admission still done
    assert S(9).key in p.table  # the step that failed


def test_a_failed_apply_keeps_the_previous_series(tmp_path: Path) -> None:
    class RefusesPort9(MemoryProvider):
        def apply(self, sessions, before_create=None):  # noqa: ANN001 - test double
            if any(s.src_port == 9 for s in sessions):
                raise ApplyError({S(9).key: "kernel said no"})
            super().apply(sessions, before_create)

    p = RefusesPort9(owned={"203.0.113.1"})
    p.apply([S(1)])
    ds = Datastore(p, default_codec(), Journal(tmp_path))
    ds.edit("candidate", EditRequest([E(S(2))]), sid=1)
    ds.commit(1, confirmed=True, persist="p")
    saved = (tmp_path / Journal.NAME).read_text()
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    with pytest.raises(DatastoreError):
        ds.commit(1, confirmed=True, persist_id="p", timeout=5)
    assert ds.pending_commit().persist == "p"
    assert json.loads((tmp_path / Journal.NAME).read_text())["created"] == json.loads(saved)["created"]
    ds.close()  # the agent stops: the pending commit is rolled back
    assert set(p.table) == {S(1).key} and not (tmp_path / Journal.NAME).exists()


def test_undo_of_a_series() -> None:
    base = {S(1).key: S(1), S(2).key: S(2)}
    first = Undo.of_commit([S(9).key, S(2).key], [S(1).key], base, {S(1).key: S(1)}, True)
    assert first.created == {S(9).key} and first.old == {S(2).key: S(2), S(1).key: S(1)}
    base2 = {S(9).key: S(9), S(2).key: S(2, pub=1)}
    later = Undo.of_commit([S(1).key, S(10).key], [S(9).key, S(2).key], base2, base2, False)
    both = first.then(later)
    assert both.created == {S(9).key, S(10).key}
    assert both.old == {S(1).key: S(1), S(2).key: S(2)} and both.admission is True


# --------------------------------------------------- journal and restart


def test_the_journal_holds_the_undo_while_pending(ds: Datastore, tmp_path: Path) -> None:
    ds.journal.directory = tmp_path / "state"
    path = tmp_path / "state" / Journal.NAME
    change_everything(ds)
    ds.commit(1, confirmed=True, persist="tok")
    doc = json.loads(path.read_text())
    assert doc["persist-id"] == "tok" and doc["admission"] is True and doc["deadline"] > time.time() + 590
    assert doc["created"] == [list(S(9).key)]
    assert sorted(r[2] for r in doc["old"]) == [1, 2]
    assert not list(path.parent.glob("*.tmp"))
    ds.commit(1, persist_id="tok")
    assert not path.exists()
    ds.edit("candidate", EditRequest([E(S(10))]), sid=1)
    ds.commit(1, confirmed=True)
    assert path.exists()
    ds.cancel_commit(1)
    assert not path.exists()


def test_a_restarted_agent_rolls_back_a_leftover_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = MemoryProvider(owned={"203.0.113.1"})
    p.apply([S(1), S(2), S(3)])
    before = dict(p.table)
    old = Datastore(p, default_codec(), Journal(tmp_path))
    change_everything(old)
    old.commit(1, confirmed=True, persist="tok")
    old.confirmed.pending.timer.cancel()  # the agent dies: no timer, no close()
    p.apply([S(20)])  # traffic while it was down
    new = Datastore(p, default_codec(), Journal(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert new.recover() is True
    assert "rolled back after a restart" in caplog.text
    assert {k: v for k, v in p.table.items() if k != S(20).key} == before and S(20).key in p.table and p.admit is True
    assert not (tmp_path / Journal.NAME).exists() and new.pending_commit() is None
    assert new.recover() is False


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "last-line-cut-short"])
def test_follow_ups_append_their_own_undo_and_a_restart_rolls_back_the_whole_series(tmp_path: Path, torn: bool) -> None:
    p = MemoryProvider(owned={"203.0.113.1"})
    p.apply([S(1), S(2), S(3)])
    before = dict(p.table)
    old = Datastore(p, default_codec(), Journal(tmp_path))
    change_everything(old)
    old.commit(1, confirmed=True, persist="tok")
    first = (tmp_path / Journal.NAME).read_text()
    old.edit("candidate", EditRequest([E(S(30))]), sid=1)
    old.commit(1, confirmed=True, persist_id="tok", timeout=300)
    old.edit("candidate", EditRequest([E(S(31))]), sid=1)
    old.commit(1, confirmed=True, persist_id="tok", timeout=400)
    text = (tmp_path / Journal.NAME).read_text()
    lines = text.splitlines()
    # The first commit's line is kept as written; each follow-up adds only what it created.
    assert text.startswith(first) and len(lines) == 3
    assert [json.loads(line)["created"] for line in lines[1:]] == [[list(S(30).key)], [list(S(31).key)]]
    old.confirmed.pending.timer.cancel()  # the agent dies: no timer, no close()
    if torn:  # ... while it appended a third follow-up, before that commit changed anything
        with (tmp_path / Journal.NAME).open("a") as f:
            f.write(lines[2][: len(lines[2]) // 2])
    rec = Journal(tmp_path).load()
    assert rec is not None and rec.persist == "tok" and rec.deadline == json.loads(lines[2])["deadline"]
    assert rec.undo.created == old.confirmed.pending.undo.created and rec.undo.old == old.confirmed.pending.undo.old
    new = Datastore(p, default_codec(), Journal(tmp_path))
    assert new.recover() is True
    assert p.table == before and p.admit is True and not (tmp_path / Journal.NAME).exists()


def test_an_unreadable_record_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / Journal.NAME).write_text("{not json")
    ds = Datastore(MemoryProvider(), default_codec(), Journal(tmp_path))
    with caplog.at_level(logging.ERROR):
        assert ds.recover() is False
    assert "cannot read" in caplog.text
    assert [f.name.startswith(Journal.NAME + ".failed-") for f in tmp_path.iterdir()] == [True]


def test_an_unwritable_journal_refuses_the_confirmed_commit(ds: Datastore, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    ds.journal.directory = tmp_path / "file"  # not a directory
    before = table(ds)
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    e = refused(ds.commit, 1, confirmed=True)
    assert e.problems[0].tag == "operation-failed" and "nothing was committed" in e.problems[0].message
    assert table(ds) == before and ds.pending_commit() is None


# ------------------------------------------------- lazy candidate, locks


class NoTableReads(MemoryProvider):
    """A provider whose table must not be read."""

    def list(self) -> Snapshot:
        raise AssertionError("the session table was read")

    def batches(self) -> Iterator[list[NatSession]]:
        raise AssertionError("the session table was read")

    def statistics(self) -> dict:
        raise AssertionError("the session table was read")


@pytest.mark.parametrize("confirmed", [False, True])
def test_a_control_only_candidate_never_reads_the_table(confirmed: bool) -> None:
    p = NoTableReads(owned={"203.0.113.1"})
    p.table[S(1).key] = S(1)
    ds = Datastore(p, default_codec())
    ds.edit("candidate", EditRequest(control={"admit-new-sessions": False}, control_operation="merge"), sid=1)
    assert ds.read("candidate", with_sessions=False)[1] == {"admit-new-sessions": False}
    ds.validate("candidate")
    ds.lock("running", 1)
    ds.commit(1, confirmed=confirmed, timeout=600)
    assert p.admit is False
    if confirmed:
        ds.cancel_commit(1)
        assert p.admit is True


def test_the_candidate_copies_the_sessions_once_an_edit_names_them() -> None:
    class Counting(MemoryProvider):
        lists = 0

        def list(self) -> Snapshot:
            type(self).lists += 1
            return super().list()

    p = Counting(owned={"203.0.113.1"})
    p.apply([S(1), S(2)])
    ds = Datastore(p, default_codec())
    ds.edit("candidate", EditRequest(control={"admit-new-sessions": False}), sid=1)
    assert Counting.lists == 0
    ds.edit("candidate", EditRequest([E(S(1), "delete")]), sid=1)
    assert Counting.lists == 1
    ds.edit("candidate", EditRequest(control={"admit-new-sessions": True}), sid=1, default_operation="replace")
    assert set(table(ds, "candidate")) == {S(2).key}  # a control-only replace leaves the list alone
    ds.edit("candidate", EditRequest(control={"admit-new-sessions": False}), sid=1)
    ds.commit(1)
    assert set(p.table) == {S(2).key} and p.admit is False


def test_lock_errors_name_the_holder(ds: Datastore) -> None:
    ds.describe = lambda sid: f"session {sid} (natmig@192.0.2.10, since 08:12:01 UTC)"
    ds.lock("running", 5)
    e = refused(ds.lock, "running", 6)
    assert e.problems[0].message == "running is locked by session 5 (natmig@192.0.2.10, since 08:12:01 UTC)"
    assert e.problems[0].info == {"session-id": "5"}
    e = refused(ds.edit, "running", EditRequest([E(S(9))]), sid=6)
    assert e.problems[0].tag == "in-use" and "natmig@192.0.2.10" in e.problems[0].message and e.problems[0].info == {"session-id": "5"}


# ------------------------------------------------------------ RPC layer


def rpc_server(provider: MemoryProvider) -> FakeServer:
    srv = FakeServer()
    srv.provider = provider
    srv.datastore = Datastore(provider, srv.codec)
    return srv


def rpc(srv: FakeServer, body: str, sid: int = 1) -> list[dict]:
    sess = SessionState(SessionRecord(sid, "natmig", "127.0.0.1", time.time()))
    reply = etree.fromstring(handle_message(srv, sess, f'<rpc xmlns="{NETCONF_NS}" message-id="1">{body}</rpc>'.encode()))
    return errors(reply)


NS = "urn:natmig:yang:nat-session"
STOP_ADMISSION = f'<edit-config><target><candidate/></target><config><nat-control xmlns="{NS}"><admit-new-sessions>false</admit-new-sessions></nat-control></config></edit-config>'


def test_capability_is_announced() -> None:
    assert "urn:ietf:params:netconf:capability:confirmed-commit:1.1" in OPTIONAL_CAPABILITIES


@pytest.mark.parametrize("value", ["0", "-1", "abc", "4294967296", "", "1.5", "٣"])
def test_bad_confirm_timeout_is_invalid_value_naming_the_element(value: str) -> None:
    srv = rpc_server(MemoryProvider())
    (e,) = rpc(srv, f"<commit><confirmed/><confirm-timeout>{value}</confirm-timeout></commit>")
    assert e["error-tag"] == "invalid-value" and e["info"] == {"bad-element": "confirm-timeout"}
    assert srv.datastore.pending_commit() is None


def test_commit_parameters_over_rpc() -> None:
    p = MemoryProvider(owned={"203.0.113.1"})
    srv = rpc_server(p)
    assert rpc(srv, STOP_ADMISSION) == []
    (e,) = rpc(srv, "<commit><persist>x</persist></commit>")  # persist needs confirmed
    assert e["error-tag"] == "invalid-value" and e["info"] == {"bad-element": "persist"}
    (e,) = rpc(srv, "<commit><confirm-timeout>5</confirm-timeout></commit>")
    assert e["info"] == {"bad-element": "confirm-timeout"}
    (e,) = rpc(srv, "<commit><persist-id>x</persist-id></commit>")
    assert e["error-tag"] == "invalid-value" and "no confirmed commit is pending" in e["error-message"]
    (e,) = rpc(srv, "<commit><confirmed/><bogus/></commit>")
    assert e["error-tag"] == "unknown-element"
    assert rpc(srv, "<commit><confirmed/><confirm-timeout>4294967295</confirm-timeout><persist>x y</persist></commit>") == []
    pending = srv.datastore.pending_commit()
    assert pending.persist == "x y" and pending.deadline > time.time() + 4e9 and p.admit is False
    (e,) = rpc(srv, "<commit><persist-id>x</persist-id></commit>", sid=2)
    assert "does not match" in e["error-message"]
    (e,) = rpc(srv, "<cancel-commit/>", sid=2)
    assert e["error-tag"] == "invalid-value" and e["info"] == {"bad-element": "persist-id"}
    (e,) = rpc(srv, "<cancel-commit><persist-id>x</persist-id><other/></cancel-commit>", sid=2)
    assert e["error-tag"] == "unknown-element"
    assert rpc(srv, "<cancel-commit><persist-id>x y</persist-id></cancel-commit>", sid=2) == []
    assert p.admit is True and srv.datastore.pending_commit() is None
    (e,) = rpc(srv, "<cancel-commit/>")
    assert "no confirmed commit is pending" in e["error-message"]


def test_a_control_only_edit_config_and_commit_over_rpc_read_no_table() -> None:
    p = NoTableReads(owned={"203.0.113.1"})
    p.table[S(1).key] = S(1)
    srv = rpc_server(p)
    assert rpc(srv, STOP_ADMISSION) == []
    f = f'<filter><nat-control xmlns="{NS}"/></filter>'
    assert rpc(srv, f"<get-config><source><candidate/></source>{f}</get-config>") == []
    assert rpc(srv, "<commit><confirmed/></commit>") == []
    assert p.admit is False
    assert rpc(srv, "<commit/>") == [] and srv.datastore.pending_commit() is None


class BatchedProvider(MemoryProvider):
    """Creates in batches of 3, telling each batch's keys first (as ConntrackProvider does); can die before a batch."""

    def __init__(self, **kw) -> None:  # noqa: ANN003 - test double
        super().__init__(**kw)
        self.told: list[list] = []
        self.die_before: int | None = None  # the batch whose create never happens: the agent died

    def apply(self, sessions, before_create=None):  # noqa: ANN001 - test double
        with self._lock:
            problems = self._check(sessions)
            if problems:
                raise ApplyError(problems)
            for i in range(0, len(sessions), 3):
                part = sessions[i:i + 3]
                if before_create is not None:
                    new = [s.key for s in part if s.key not in self.table]
                    before_create(new)
                    self.told.append(new)
                if self.die_before == i // 3:
                    raise SystemExit("the agent died")  # nothing of this batch or after reached the node
                for s in part:
                    self.table[s.key] = s


@pytest.mark.parametrize("dies", [False, True], ids=["whole", "died-before-the-third-batch"])
def test_a_large_commit_journals_its_creates_batch_by_batch_and_a_restart_rolls_back_those_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies: bool) -> None:
    monkeypatch.setattr("natmig.agent.datastore.JOURNAL_AHEAD", 4)
    p = BatchedProvider(owned={"203.0.113.1"})
    p.apply([S(1), S(2)])
    before = dict(p.table)
    old = Datastore(p, default_codec(), Journal(tmp_path))
    old.edit("candidate", EditRequest([E(S(2), "delete")] + [E(S(i)) for i in range(10, 20)]), sid=1)
    if dies:
        p.die_before = 2
        with pytest.raises(SystemExit):
            old.commit(1, confirmed=True, persist="tok")
        assert len(p.table) == 1 + 6  # S(1) and two batches of three: S(2) deleted, not recreated yet
    else:
        old.commit(1, confirmed=True, persist="tok")
        old.confirmed.pending.timer.cancel()  # the agent dies: no timer, no close()
        assert len(p.table) == 1 + 10
    lines = (tmp_path / Journal.NAME).read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    # The undo of what is not created first (the deleted S(2)), then each batch's keys, each before the node got it.
    assert docs[0]["created"] == [] and [row[2] for row in docs[0]["old"]] == [2]
    assert [sorted(k[2] for k in d["created"]) for d in docs[1:]] == [[10, 11, 12], [13, 14, 15], [16, 17, 18], [19]][:len(p.told)]
    assert all(d["persist-id"] == "tok" for d in docs)
    new = Datastore(p, default_codec(), Journal(tmp_path))
    assert new.recover() is True
    assert p.table == before and not (tmp_path / Journal.NAME).exists()
