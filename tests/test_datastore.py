"""Datastore semantics over MemoryProvider: edit-config operations, all-or-nothing, candidate, locks."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natmig.agent import datastoreedit
from natmig.agent.datastore import Datastore, DatastoreError, EditRequest, select
from natmig.agent.provider import MemoryProvider
from natmig.codec import EditEntry, default_codec
from natmig.model import NatSession


def S(port: int, pub: int | None = None, **kw) -> NatSession:
    return NatSession("TCP", "10.0.0.2", port, "198.51.100.1", 80, kw.pop("addr", "203.0.113.1"), pub or 20000 + port, "ESTABLISHED", kw.pop("timeout", 100), **kw)


def E(s: NatSession, op: str | None = None, **only) -> EditEntry:
    values = {k: v for k, v in zip(("protocol", "src_address", "src_port", "dst_address", "dst_port"), s.key)}
    if not only:
        values.update(translated_address=s.translated_address, translated_port=s.translated_port, tcp_state=s.tcp_state, timeout=s.timeout)
    values.update(only)
    return EditEntry(op, s.key, values)


@pytest.fixture
def ds() -> Datastore:
    p = MemoryProvider(owned={"203.0.113.1"})
    p.apply([S(1), S(2), S(3)])
    return Datastore(p, default_codec())


def table(ds: Datastore, source: str = "running") -> dict:
    return {s.key: s for s in ds.read(source)[0]}


def tags(e: pytest.ExceptionInfo) -> list[str]:
    return [p.tag for p in e.value.problems]


def test_merge_changes_only_the_named_leaves(ds: Datastore) -> None:
    ds.edit("running", EditRequest([E(S(1), "merge", mark=7)]), sid=1)
    assert table(ds)[S(1).key] == S(1, mark=7)


def test_replace_drops_leaves_not_given(ds: Datastore) -> None:
    new = NatSession(*S(1).key, "203.0.113.1", 20001)
    ds.edit("running", EditRequest([EditEntry("replace", new.key, {"protocol": "TCP", "src_address": "10.0.0.2", "src_port": 1, "dst_address": "198.51.100.1", "dst_port": 80, "translated_address": "203.0.113.1", "translated_port": 20001})]), sid=1)
    got = table(ds)[new.key]
    assert got.timeout is None and got.tcp_state == "ESTABLISHED"  # the default


def test_create_existing_is_data_exists_and_nothing_applied(ds: Datastore) -> None:
    before = table(ds)
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(9), "create"), E(S(1), "create")]), sid=1)
    assert tags(e) == ["data-exists"]
    assert table(ds) == before


def test_delete_missing_is_data_missing_remove_is_not(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(9), "delete")]), sid=1)
    assert tags(e) == ["data-missing"]
    ds.edit("running", EditRequest([E(S(9), "remove"), E(S(1), "delete")]), sid=1)
    assert set(table(ds)) == {S(2).key, S(3).key}


def test_default_operation_replace_makes_the_list_exactly_the_request(ds: Datastore) -> None:
    ds.edit("running", EditRequest([E(S(5))]), sid=1, default_operation="replace")
    assert list(table(ds)) == [S(5).key]


def test_default_operation_none_needs_existing_entries(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(8))]), sid=1, default_operation="none")
    assert tags(e) == ["data-missing"]
    ds.edit("running", EditRequest([E(S(1)), E(S(8), "create")]), sid=1, default_operation="none")
    assert S(8).key in table(ds)


def test_whole_list_remove_and_delete(ds: Datastore) -> None:
    ds.edit("running", EditRequest(list_operation="remove"), sid=1)
    assert table(ds) == {}
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest(list_operation="delete"), sid=1)
    assert tags(e) == ["data-missing"]


def test_missing_mandatory_leaf_on_create(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(9), "create", translated_address="203.0.113.1")]), sid=1)
    assert tags(e) == ["missing-element"]
    assert e.value.problems[0].leaf == "translated_port"


def test_conflicting_public_port_refuses_the_whole_edit(ds: Datastore) -> None:
    before = table(ds)
    with pytest.raises(DatastoreError) as e:
        # S(9) would take S(1)'s public port; S(10) is fine but must not be applied either.
        ds.edit("running", EditRequest([E(S(10)), E(S(9, pub=20001))]), sid=1)
    assert tags(e) == ["operation-failed"]
    assert e.value.problems[0].app_tag == "data-not-unique"
    assert table(ds) == before


def test_public_port_freed_by_a_delete_in_the_same_edit_can_be_reused(ds: Datastore) -> None:
    ds.edit("running", EditRequest([E(S(1), "delete"), E(S(9, pub=20001))]), sid=1)
    assert table(ds)[S(9).key].translated_port == 20001


def test_foreign_translated_address_is_invalid_value(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(9, addr="203.0.113.99"))]), sid=1)
    assert tags(e) == ["invalid-value"] and e.value.problems[0].leaf == "translated_address"


def test_provider_failure_half_way_rolls_back_the_deletes() -> None:
    class Failing(MemoryProvider):
        def apply(self, sessions, before_create=None):  # noqa: ANN001 - test double
            if any(s.src_port == 9 for s in sessions):
                raise __import__("natmig.agent.provider", fromlist=["ApplyError"]).ApplyError({sessions[0].key: "kernel said no"})
            return super().apply(sessions, before_create)

    p = Failing(owned={"203.0.113.1"})
    p.apply([S(1), S(2)])
    ds = Datastore(p, default_codec())
    before = table(ds)
    with pytest.raises(DatastoreError):
        ds.edit("running", EditRequest([E(S(1), "delete"), E(S(9))]), sid=1)
    assert table(ds) == before


def test_test_only_applies_nothing(ds: Datastore) -> None:
    before = table(ds)
    ds.edit("running", EditRequest([E(S(9))]), sid=1, test_option="test-only")
    assert table(ds) == before


def test_continue_on_error_applies_the_good_part_and_reports_the_rest(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(9)), E(S(1), "create")]), sid=1, error_option="continue-on-error")
    assert tags(e) == ["data-exists"]
    assert S(9).key in table(ds)


def test_candidate_is_staged_until_commit(ds: Datastore) -> None:
    ds.edit("candidate", EditRequest([E(S(9)), E(S(1), "delete")]), sid=1)
    assert S(9).key not in table(ds)
    assert S(9).key in table(ds, "candidate") and S(1).key not in table(ds, "candidate")
    ds.commit(sid=1)
    assert S(9).key in table(ds) and S(1).key not in table(ds)


def test_commit_keeps_sessions_created_on_running_meanwhile(ds: Datastore) -> None:
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    ds.provider.apply([S(20)])  # traffic opened a session after the candidate was copied
    ds.commit(sid=1)
    assert {S(9).key, S(20).key} <= set(table(ds))


def test_discard_changes(ds: Datastore) -> None:
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    ds.discard(sid=1)
    assert table(ds, "candidate") == table(ds)


def test_nat_control_goes_to_the_provider(ds: Datastore) -> None:
    ds.edit("running", EditRequest(control={"admit-new-sessions": False}), sid=1)
    assert ds.provider.admission() is False
    ds.edit("candidate", EditRequest(control={"admit-new-sessions": True}), sid=1)
    assert ds.provider.admission() is False
    ds.commit(sid=1)
    assert ds.provider.admission() is True


def test_locks(ds: Datastore) -> None:
    ds.lock("running", 1)
    with pytest.raises(DatastoreError) as e:
        ds.lock("running", 2)
    assert tags(e) == ["lock-denied"] and e.value.problems[0].info["session-id"] == "1"
    with pytest.raises(DatastoreError) as e:
        ds.edit("running", EditRequest([E(S(9))]), sid=2)
    assert tags(e) == ["in-use"]
    with pytest.raises(DatastoreError):
        ds.unlock("running", 2)
    ds.edit("running", EditRequest([E(S(9))]), sid=1)
    ds.release_session(1)
    ds.lock("running", 2)


def test_candidate_with_changes_cannot_be_locked_and_session_end_discards(ds: Datastore) -> None:
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    with pytest.raises(DatastoreError) as e:
        ds.lock("candidate", 2)
    assert tags(e) == ["lock-denied"]
    ds.discard(sid=1)
    ds.lock("candidate", 1)
    ds.edit("candidate", EditRequest([E(S(9))]), sid=1)
    ds.release_session(1)  # killed or closed while holding the candidate lock
    assert S(9).key not in table(ds, "candidate")


def test_unknown_datastore(ds: Datastore) -> None:
    with pytest.raises(DatastoreError) as e:
        ds.read("startup")
    assert tags(e) == ["invalid-value"]


def test_select() -> None:
    rows = [S(1), S(2), NatSession("UDP", "10.0.0.3", 53, "198.51.100.2", 53, "203.0.113.1", 21000)]
    assert select(rows, None) == rows
    assert select(rows, []) == []
    assert select(rows, [{"protocol": "UDP"}]) == rows[2:]
    assert select(rows, [{"src_port": 1}, {"src_port": 2}]) == rows[:2]
    assert select(rows, [{"src_port": 1, "protocol": "UDP"}]) == []


# -- the candidate's reply-tuple index against a check of the whole candidate --

_OPS = ["merge", "replace", "create", "delete", "remove", None]


@st.composite
def candidate_edits(draw: st.DrawFn) -> list[tuple[list[EditEntry], str, str]]:
    """Edits of a few sessions whose public ports often collide, with every operation and error option."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        entries = []
        for port in draw(st.lists(st.integers(1, 8), max_size=6)):
            pub = draw(st.sampled_from([None, 20001, 20002, 20003]))
            addr = draw(st.sampled_from(["203.0.113.1", "203.0.113.1", "203.0.113.9"]))
            op = draw(st.sampled_from(_OPS))
            state = draw(st.sampled_from(["ESTABLISHED", "ESTABLISHED", "TIME_WAIT"]))
            entries.append(E(replace(S(port, pub, addr=addr), tcp_state=state), op) if op not in ("delete", "remove") else E(S(port), op, ))
        out.append((entries, draw(st.sampled_from(["merge", "replace", "none"])), draw(st.sampled_from(["stop-on-error", "continue-on-error"]))))
    return out


def _run_candidate_edits(edits: list[tuple[list[EditEntry], str, str]], indexed: bool, monkeypatch: pytest.MonkeyPatch) -> list:
    p = MemoryProvider(owned={"203.0.113.1"})
    p.apply([S(1), S(2), S(3)])
    ds = Datastore(p, default_codec())
    with monkeypatch.context() as m:
        if not indexed:
            m.setattr(Datastore, "_candidate_replies", lambda self: None)
        seen: list = []
        for entries, default, on_error in edits:
            try:
                ds.edit("candidate", EditRequest(list(entries)), sid=1, default_operation=default, error_option=on_error)
                seen.append("ok")
            except DatastoreError as e:
                seen.append(sorted((pr.tag, pr.message) for pr in e.problems))
            seen.append(table(ds, "candidate"))
        try:
            ds.commit(sid=1)
            seen.append(table(ds))
        except DatastoreError as e:
            seen.append(sorted((pr.tag, pr.message) for pr in e.problems))
    return seen


@given(candidate_edits())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_candidate_edits_checked_by_the_reply_index_as_by_the_whole_candidate(monkeypatch: pytest.MonkeyPatch, edits) -> None:
    assert _run_candidate_edits(edits, True, monkeypatch) == _run_candidate_edits(edits, False, monkeypatch)


def test_the_candidate_is_checked_by_its_reply_index(ds: Datastore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Slices of a copy: each is checked against the index, not by a pass over the candidate.
    ds.edit("candidate", EditRequest([E(S(10)), E(S(11))]), sid=1)
    whole = datastoreedit.check_batch

    def batch_alone(sessions, existing, owned):  # noqa: ANN001, ANN202 - a spy
        assert not existing, "checked the whole candidate"
        return whole(sessions, existing, owned)

    monkeypatch.setattr(datastoreedit, "check_batch", batch_alone)
    ds.edit("candidate", EditRequest([E(S(12)), E(S(13))]), sid=1)
    with pytest.raises(DatastoreError) as e:
        ds.edit("candidate", EditRequest([E(S(14, 20012))]), sid=1)  # S(12)'s public port
    assert tags(e) == ["operation-failed"] and "already used" in e.value.problems[0].message
    ds.edit("candidate", EditRequest([E(S(12), "delete"), E(S(14, 20012))]), sid=1)  # freed by the delete in the same edit
    assert set(table(ds, "candidate")) == {S(p).key for p in (1, 2, 3, 10, 11, 13, 14)}


def W(port: int, pub: int) -> NatSession:
    """A closed TCP connection (TIME_WAIT) of public port ``pub``."""
    return replace(S(port, pub), tcp_state="TIME_WAIT")


@pytest.mark.parametrize("slices", ["one edit", "two edits"])
def test_a_closed_connection_gives_its_public_port_up_to_a_live_one_in_the_candidate(ds: Datastore, slices: str) -> None:
    # A copy read while the source served: the kernel gave a closed
    # connection's port to a new one between the two reads.  The closed one goes.
    closed, live = W(50, 20060), S(60)
    for first, second in ((closed, live), (live, closed)):
        edits = [[E(first), E(second)]] if slices == "one edit" else [[E(first)], [E(second)]]
        for entries in edits:
            ds.edit("candidate", EditRequest(entries), sid=1)
        cand = table(ds, "candidate")
        assert live.key in cand and closed.key not in cand, (first, second)
        ds.discard(sid=1)
    ds.edit("candidate", EditRequest([E(closed), E(live)]), sid=1)
    ds.commit(sid=1)
    got = table(ds)
    assert got[live.key].translated_port == 20060 and closed.key not in got


def test_a_closed_connection_of_running_gives_its_port_up_at_commit_and_two_live_ones_still_clash(ds: Datastore) -> None:
    closed = W(50, 20070)
    ds.edit("running", EditRequest([E(closed)]), sid=1)
    ds.edit("candidate", EditRequest([E(S(70))]), sid=1)          # S(70) wants port 20070
    assert closed.key not in table(ds, "candidate")
    ds.commit(sid=1)
    assert closed.key not in table(ds) and table(ds)[S(70).key].translated_port == 20070
    before = table(ds)
    with pytest.raises(DatastoreError) as e:
        ds.edit("candidate", EditRequest([E(S(80, 20070))]), sid=1)  # live against live
    assert tags(e) == ["operation-failed"] and "already used by" in e.value.problems[0].message
    udp = NatSession("UDP", "10.0.0.2", 90, "198.51.100.1", 80, "203.0.113.1", 20090, None, 30)
    with pytest.raises(DatastoreError):
        # Only TCP's closed states yield; a UDP mapping is kept until it times out.
        ds.edit("candidate", EditRequest([E(udp, "merge", **{"protocol": "UDP", "src_address": "10.0.0.2", "src_port": 90, "dst_address": "198.51.100.1", "dst_port": 80, "translated_address": "203.0.113.1", "translated_port": 20090, "timeout": 30}),
                                          E(replace(udp, src_port=91), "merge", **{"protocol": "UDP", "src_address": "10.0.0.2", "src_port": 91, "dst_address": "198.51.100.1", "dst_port": 80, "translated_address": "203.0.113.1", "translated_port": 20090, "timeout": 30})]), sid=1)
    assert table(ds) == before
