"""Unit tests of the migration's phases, catch-up and rollback, over in-memory nodes."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from natmig.agent.provider import MemoryProvider
from natmig.controller.migrate import Endpoint, MigrateOptions, Migration, MigrationError, migrate
from natmig.codec import NETCONF_NS, default_codec
from natmig.controller.ncerrors import ConnectError, HostKeyError
from natmig.controller.nodeproto import ALL_FEATURES, CHUNKS, RANGES, SESSIONS_AND_ADMISSION, STATISTICS, TABLE_TEXT
from natmig.wire.natreply import TableReply
from natmig.errors import ControllerError
from natmig.model import table_digest

from .controller_fakes import FakeNode, FakeSteering, sessions

CODEC = default_codec()
PHASES = ["preflight", "copy", "catch-up", "switch", "verify", "admit", "retire"]


def setup(n: int = 100, target_sessions=()):
    src = FakeNode("nat1", MemoryProvider(table={s.key: s for s in sessions(n)}))
    tgt = FakeNode("nat2", MemoryProvider(table={s.key: s for s in target_sessions}))
    sw = FakeSteering("nat1")
    return src, tgt, sw


def run(src, tgt, sw, **opts):
    m = Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", lambda: tgt), sw, MigrateOptions(**opts))
    return m.run()


def churn(src, new, gone):
    """A hook that makes the source gain ``new`` and lose ``gone`` (sessions born and closed after the snapshot)."""
    def hook():
        src.provider.apply(new)
        src.provider.delete([s.key for s in gone])
    return hook


def keys_map(node):
    return {s.key: (s.translated_address, s.translated_port) for s in node.provider.list().sessions}


def test_happy_path_moves_every_session_and_times_every_phase():
    src, tgt, sw = setup(100)
    before = keys_map(src)
    r = run(src, tgt, sw)
    assert r.ok, r.error
    assert [p.name for p in r.phases] == PHASES
    assert all(p.ok and p.seconds >= 0 for p in r.phases)
    assert keys_map(tgt) == before
    assert keys_map(src) == {}  # retired: deleted
    assert sw.active() == "nat2" and sw.moves == ["nat2"]
    assert r.copied == 100 and r.verified == 100 and r.retired == 100
    assert tgt.provider.admission() and src.provider.admission()
    assert r.traffic_on == "nat2"
    # the copy went through the candidate and a commit, before the switch
    assert tgt.calls.index("edit-config:candidate") < tgt.calls.index("commit")


def test_target_holds_admission_closed_until_verified():
    src, tgt, sw = setup(5)
    seen = {}
    orig = sw.point_to

    def spy(nat):
        seen["target_admits_at_switch"] = tgt.provider.admission()
        seen["source_admits_at_switch"] = src.provider.admission()
        orig(nat)
    sw.point_to = spy
    assert run(src, tgt, sw).ok
    assert seen == {"target_admits_at_switch": False, "source_admits_at_switch": False}


def test_sessions_created_and_closed_after_the_snapshot_are_caught_up():
    src, tgt, sw = setup(50)
    extra = sessions(3, base_port=29000)
    gone = sessions(50)[:2]
    # After the snapshot: three new sessions appear, two old ones end.
    tgt.hooks["commit"] = churn(src, extra, gone)
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.caught_up >= 3 and r.caught_up_deleted >= 2
    t = keys_map(tgt)
    for s in extra:
        assert t[s.key] == (s.translated_address, s.translated_port)
    for s in gone:
        assert s.key not in t
    assert r.reconciled == 0


def test_a_late_event_is_reconciled_before_admission_opens():
    src, tgt, sw = setup(10)
    src.drop_events = True  # notifications never arrive
    late = sessions(1, base_port=29500)[0]
    tgt.hooks["commit"] = lambda: src.provider.apply([late])
    r = run(src, tgt, sw)
    assert r.ok, r.error
    assert r.reconciled == 1
    assert keys_map(tgt)[late.key] == ("203.0.113.1", 29500)


def test_failure_before_switch_leaves_traffic_on_source_and_removes_copies():
    src, tgt, sw = setup(20, target_sessions=sessions(1, public="203.0.113.1", base_port=5000, proto="UDP"))
    tgt.fail["set-admission:False"] = ControllerError("agent went away")
    before_src = keys_map(src)
    r = run(src, tgt, sw)
    assert not r.ok
    assert r.failed_phase == "catch-up"
    assert "agent went away" in r.error
    assert sw.active() == "nat1" and sw.moves == []
    assert keys_map(src) == before_src
    assert set(keys_map(tgt)) == {s.key for s in sessions(1, base_port=5000, proto="UDP")}  # its own session kept
    assert src.provider.admission() and tgt.provider.admission()
    assert r.traffic_on == "nat1"
    assert "carries traffic" in r.node_state["nat1"]
    assert "removed" in r.node_state["nat2"]


def test_commit_refused_discards_candidate():
    src, tgt, sw = setup(5)
    tgt.fail["commit"] = ControllerError("commit refused")
    r = run(src, tgt, sw)
    assert r.failed_phase == "copy" and not r.ok
    assert "discard" in tgt.calls and tgt.candidate == []
    assert keys_map(tgt) == {} and sw.moves == []


def test_verification_failure_after_switch_points_traffic_back():
    src, tgt, sw = setup(10)
    tgt.remap = True  # the target writes every session with another port
    before = keys_map(src)
    with pytest.raises(MigrationError) as ei:
        migrate(Endpoint("nat1", lambda: src), Endpoint("nat2", lambda: tgt), sw)
    r = ei.value.report
    assert r.failed_phase == "verify"
    assert "re-mapped" in r.error
    assert sw.moves == ["nat2", "nat1"] and sw.active() == "nat1"
    assert keys_map(src) == before  # nothing retired
    assert src.provider.admission()
    assert "verify" in str(ei.value) and "nat1" in str(ei.value)


def test_unreachable_or_wrong_host_key_changes_nothing():
    src, tgt, sw = setup(5)

    def refuse():
        raise HostKeyError("nat2: host key is not the known key")
    m = Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", refuse), sw)
    r = m.run()
    assert r.failed_phase == "preflight" and "host key" in r.error
    assert sw.moves == [] and src.provider.admission()
    assert not any(c.startswith(("edit", "set-admission", "delete")) for c in src.calls)


def test_revision_mismatch_is_refused_in_preflight():
    src, tgt, sw = setup(5)
    tgt.revision = "2020-01-01"
    r = run(src, tgt, sw)
    assert r.failed_phase == "preflight" and "2020-01-01" in r.error
    tgt.revision = None
    src2, tgt2, sw2 = setup(5)
    tgt2.revision = None
    r2 = run(src2, tgt2, sw2)
    assert "do not announce" in r2.error


def test_incompatible_target_is_refused_before_any_write():
    clash = replace(sessions(1)[0], src_port=9, protocol="TCP")  # other key, same public port
    src, tgt, sw = setup(5, target_sessions=[clash])
    r = run(src, tgt, sw)
    assert r.failed_phase == "copy" and "held on the target" in r.error
    assert not any(c.startswith("edit") for c in tgt.calls)


def test_traffic_not_on_source_is_refused():
    src, tgt, sw = setup(5)
    sw._active = "nat2"
    r = run(src, tgt, sw)
    assert r.failed_phase == "preflight" and "not through the source" in r.error


def test_switch_refused_keeps_source():
    src, tgt, sw = setup(5)
    sw.fail_to = "nat2"
    r = run(src, tgt, sw)
    assert r.failed_phase == "switch"
    assert sw.active() == "nat1" and keys_map(tgt) == {}
    assert src.provider.admission() and tgt.provider.admission()


def test_no_state_skips_the_copy():
    src, tgt, sw = setup(5)
    r = run(src, tgt, sw)
    assert r.ok
    src, tgt, sw = setup(5)
    r = run(src, tgt, sw, copy_state=False, retire="keep")
    assert r.ok and [p.name for p in r.phases] == ["preflight", "switch", "admit", "retire"]
    assert keys_map(tgt) == {} and sw.active() == "nat2"


def test_retire_stop_calls_the_stop_hook_and_needs_one():
    src, tgt, sw = setup(3)
    stopped = []
    r = Migration(Endpoint("nat1", lambda: src, stop=lambda: stopped.append(1)), Endpoint("nat2", lambda: tgt), sw, MigrateOptions(retire="stop")).run()
    assert r.ok and stopped == [1]
    src, tgt, sw = setup(3)
    r = run(src, tgt, sw, retire="stop")
    assert r.failed_phase == "retire" and "no way to stop" in r.error


def test_bad_options_are_refused():
    with pytest.raises(ControllerError, match="retire"):
        MigrateOptions(retire="explode")
    with pytest.raises(ControllerError, match="settle"):
        MigrateOptions(settle=2, settle_max=1)


def test_public_address_not_owned_by_target_is_refused():
    src, tgt, sw = setup(3)
    m = Migration(Endpoint("nat1", lambda: src, public={"203.0.113.1"}), Endpoint("nat2", lambda: tgt, public={"203.0.113.2"}), sw)
    r = m.run()
    assert r.failed_phase == "preflight" and "203.0.113.1" in r.error


def test_connect_error_names_the_agent():
    src, tgt, sw = setup(3)

    def down():
        raise ConnectError("nat2:830 connection refused")
    r = Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", down), sw).run()
    assert "target nat2" in r.error and r.traffic_on == "nat1"


def test_retire_failure_does_not_move_traffic_back():
    src, tgt, sw = setup(5)
    src.fail["delete:running"] = ControllerError("source agent busy")
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "retire"
    assert sw.moves == ["nat2"] and sw.active() == "nat2" and r.traffic_on == "nat2"
    assert len(keys_map(tgt)) == 5 and tgt.provider.admission()
    assert "retirement failed" in r.node_state["nat1"]
    assert src.provider.admission()  # reopened even so


def test_copy_goes_in_chunks_into_the_candidate_and_one_commit():
    src, tgt, sw = setup(95)
    r = run(src, tgt, sw, copy_chunk=20, retire="keep")
    assert r.ok and len(keys_map(tgt)) == 95
    # The five slices, then one confirmed commit; confirmed before the switch, then the hold and its confirm at admit.
    first_commit = tgt.calls.index("commit")
    assert tgt.calls[:first_commit].count("edit-config:candidate") == 5
    assert tgt.commits == ["confirmed", "confirm", "confirmed", "confirm"]
    with pytest.raises(ControllerError, match="copy_chunk"):
        MigrateOptions(copy_chunk=0)


# ------------------------------------------------- verify: the source's digest


class CountingNode(FakeNode):
    """A node that also answers nat-statistics (as the real client's get_statistics does), and reads as NodeClient does."""

    features = frozenset({STATISTICS, CHUNKS, SESSIONS_AND_ADMISSION, TABLE_TEXT})
    codec = default_codec()

    def get_statistics(self) -> dict[str, object]:
        self._enter("get-statistics")
        snap = self.provider.list()
        return {"sessions": len(snap.sessions), "untranslated": snap.untranslated, "digest": table_digest(snap.sessions)}

    def session_chunks(self, source: str = "running", size: int = 25_000, pieces: int = 1):
        self._enter(f"get-config:{source}")
        table = list(self.provider.list().sessions)
        return iter([table[i:i + size] for i in range(0, len(table), size)])

    def get_sessions_and_admission(self, source: str = "running"):
        self._enter(f"get-config+control:{source}")
        return list(self.provider.list().sessions), self.provider.admission()

    #: bytes per chunk a tapped read_table hands out (as an agent streaming its table sends them); 0: not tapped
    stream_chunk = 700

    def read_table(self, source: str = "running", on_chunk=None, keep: bool = True) -> TableReply:
        table = self.get_sessions(source)
        body = CODEC.encode_xml(table, root=None).decode()
        reply = TableReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="1"><data>{body}</data></rpc-reply>', CODEC)
        return tapped(reply, on_chunk, self.stream_chunk, keep)


def tapped(reply: TableReply, on_chunk, size: int = 700, keep: bool = True) -> TableReply:
    """Hand out the reply's bytes in chunks first, as NodeClient.read_table does for a streamed reply (not kept: only its root element stays)."""
    if on_chunk is not None and size:
        data = reply.raw.encode()
        for i in range(0, len(data), size):
            on_chunk(data[i:i + size])
        reply.tapped = True
        reply.received = len(data)
        if not keep:
            reply.raw, reply.elided = f'<rpc-reply xmlns="{NETCONF_NS}" message-id="1"></rpc-reply>', True
    return reply


def counting_setup(n: int):
    src = CountingNode("nat1", MemoryProvider(table={s.key: s for s in sessions(n)}))
    tgt = CountingNode("nat2", MemoryProvider())
    return src, tgt, FakeSteering("nat1")


def test_verify_reads_only_the_sources_digest_when_it_matches_snapshot_and_events():
    src, tgt, sw = counting_setup(40)
    extra = sessions(2, base_port=29000)
    gone = sessions(40)[:3]
    tgt.hooks["commit"] = churn(src, extra, gone)
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == "digest"
    assert src.calls.count("get-config:running") == 1  # the snapshot only: no re-read
    assert "get-statistics" in src.calls
    assert r.verified == 40 - 3 + 2
    assert keys_map(tgt) == keys_map(src)


def test_verify_source_read_always_rereads_the_source():
    src, tgt, sw = counting_setup(12)
    r = run(src, tgt, sw, retire="keep", verify_source="read")
    assert r.ok, r.error
    # The one nat-statistics read is the report's read-back, after the migration.
    assert r.source_check == "read" and src.calls.count("get-statistics") == 1
    assert src.calls.count("get-config:running") == 2 and r.verified == 12


def test_an_unknown_verify_source_is_refused():
    with pytest.raises(ControllerError, match="verify_source"):
        MigrateOptions(verify_source="maybe")


def test_verify_rereads_the_source_when_its_digest_differs_and_reconciles_a_late_session():
    src, tgt, sw = counting_setup(10)
    src.drop_events = True  # notifications never arrive: the digest shows one more session
    late = sessions(1, base_port=29500)[0]
    tgt.hooks["commit"] = lambda: src.provider.apply([late])
    r = run(src, tgt, sw)
    assert r.ok, r.error
    assert r.source_check == "read"
    assert src.calls.count("get-config:running") == 2
    assert r.reconciled == 1
    assert keys_map(tgt)[late.key] == ("203.0.113.1", 29500)


def test_a_late_create_and_a_late_destroy_do_not_cancel_out():
    # Both notifications lost: the count is unchanged, the table is not.
    # Only the digest sees it; verify must re-read and bring the new session over.
    src, tgt, sw = counting_setup(10)
    src.drop_events = True
    late = sessions(1, base_port=29600)[0]
    gone = sessions(10)[0]
    tgt.hooks["commit"] = churn(src, [late], [gone])
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == "read" and r.reconciled == 1
    assert keys_map(tgt)[late.key] == ("203.0.113.1", 29600)


def test_verify_by_digest_still_checks_the_whole_target():
    src, tgt, sw = counting_setup(10)
    victim = sessions(10)[4]
    # The target loses one copied session before verification: it is found and written again.
    tgt.hooks["set-admission:False"] = lambda: tgt.provider.delete([victim.key])
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == "digest" and r.reconciled == 1
    assert r.target_check == "read"  # its digest differed, so its table was read and compared
    assert keys_map(tgt) == keys_map(src)


def test_an_idle_target_is_verified_by_its_digest_without_reading_its_table():
    src, tgt, sw = counting_setup(25)
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == "digest" and r.target_check == "digest" and r.verified == 25
    after_commit = tgt.calls[tgt.calls.index("commit"):]
    assert "get-statistics" in after_commit
    assert not any(c.startswith("get-config") for c in after_commit), after_commit


def test_verify_by_digest_refuses_a_remapping_target_and_points_traffic_back():
    src, tgt, sw = counting_setup(10)
    tgt.remap = True
    before = keys_map(src)
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "verify" and "re-mapped" in r.error
    assert r.target_check == "read"
    assert sw.moves == ["nat2", "nat1"] and keys_map(src) == before



def test_both_digests_are_asked_for_while_the_switch_happens():
    """The switch waits here until both nodes have been asked: a request sent only after it would never come."""
    src, tgt, sw = counting_setup(12)
    asked = {"nat1": threading.Event(), "nat2": threading.Event()}
    src.hooks["get-statistics"] = asked["nat1"].set
    tgt.hooks["get-statistics"] = asked["nat2"].set

    class WaitingSteering(FakeSteering):
        def point_to(self, nat: str) -> None:
            if nat == "nat2":
                for name, ev in asked.items():
                    assert ev.wait(5), f"{name}'s digest was not requested before the switch"
            super().point_to(nat)

    sw = WaitingSteering("nat1")
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == r.target_check == "digest" and r.verified == 12
    # asked once each for verify, once each again by the report's read-back
    assert src.calls.count("get-statistics") == tgt.calls.count("get-statistics") == 2


def test_a_target_that_cannot_give_its_digest_fails_verify_and_traffic_goes_back():
    src, tgt, sw = counting_setup(10)
    before = keys_map(src)
    tgt.fail["get-statistics"] = ControllerError("nat2: session lost")
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "verify" and "session lost" in r.error
    assert sw.moves == ["nat2", "nat1"] and keys_map(src) == before
    assert src.provider.admission() is True


def test_preflight_reads_the_targets_table_and_admission_in_one_request_and_refuses_a_closed_admission():
    src, tgt, sw = counting_setup(10)
    tgt.provider.set_admission(False)  # an earlier migration was interrupted, or an operator closed it
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "preflight"
    assert "target nat2 does not admit new sessions" in r.error and "natmig recover" in r.error
    # one request in preflight (the later get-admission is the report's read-back)
    assert tgt.calls[3] == "get-config+control:running" and tgt.calls[4:6] == ["get-admission", "get-statistics"]
    assert "edit-config:candidate" not in tgt.calls and "commit" not in tgt.calls and src.commits == []
    assert r.readback["nat2"]["admits"] is False and "REFUSES new sessions" in r.node_state["nat2"]


def test_a_refused_copy_commit_leaves_both_admissions_and_tables_as_they_were():
    src, tgt, sw = counting_setup(10)
    tgt.fail["commit"] = ControllerError("commit refused")
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "copy"
    assert tgt.provider.admission() is True and src.provider.admission() is True
    assert keys_map(tgt) == {} and len(keys_map(src)) == 10 and sw.active() == "nat1"



# ------------------------------------------- copy: decoded while the target writes


def test_copy_into_an_idle_target_streams_slices_into_the_candidate_then_commits():
    src, tgt, sw = counting_setup(95)
    before = keys_map(src)
    r = run(src, tgt, sw, retire="keep", copy_chunk=20)
    assert r.ok, r.error
    assert tgt.calls.count("edit-config:candidate") == 5  # 20+20+20+20+15
    last_edit = len(tgt.calls) - 1 - tgt.calls[::-1].index("edit-config:candidate")
    assert last_edit < tgt.calls.index("commit")
    assert keys_map(tgt) == before and r.copied == 95 and r.verified == 95
    assert "decode+edit-config" in r.phases[1].steps


def test_copy_into_a_target_holding_sessions_is_not_streamed():
    src, tgt, sw = counting_setup(30)
    own = sessions(2, base_port=40000, first=5000)
    tgt.provider.apply(own)
    r = run(src, tgt, sw, retire="keep", copy_chunk=10)
    assert r.ok, r.error
    assert "decode+edit-config" not in r.phases[1].steps and "edit-config" in r.phases[1].steps
    assert set(keys_map(tgt)) == set(keys_map(src)) | {s.key for s in own}


def test_streamed_copy_whose_plan_fails_commits_nothing():
    src, tgt, sw = counting_setup(30)
    m = Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", lambda: tgt, public={"203.0.113.9"}), sw, MigrateOptions(copy_chunk=10))
    r = m.run()
    assert not r.ok and r.failed_phase == "copy" and "does not own" in r.error
    assert "discard" in tgt.calls and "commit" not in tgt.calls
    assert keys_map(tgt) == {} and sw.moves == []


# ------------------------------------- copy: the source's text forwarded as it is


class TextNode(CountingNode):
    """A node that also takes entries as XML text (as NodeClient.edit_text does), decoding them as an agent would."""

    #: everything but the comparison by key range (tests/test_rangecheck.py has a node with it)
    features = ALL_FEATURES - {RANGES}

    def edit_text(self, entries: str, target: str = "candidate") -> None:
        from lxml import etree

        self.calls.append("edit-text")
        config = etree.fromstring(f'<config xmlns="{NETCONF_NS}">{entries}</config>')
        self.edit_sessions(CODEC.decode_xml(config), target=target, operation="merge")


def text_setup(n: int, table=None):
    src = TextNode("nat1", MemoryProvider(table={s.key: s for s in (table if table is not None else sessions(n))}))
    tgt = TextNode("nat2", MemoryProvider())
    return src, tgt, FakeSteering("nat1")


def never_decoded(monkeypatch):
    def boom(self):
        raise AssertionError("the snapshot was decoded")
    monkeypatch.setattr(TableReply, "sessions", boom)


def test_copy_into_an_idle_target_forwards_the_sources_text_and_is_verified_by_both_digests(monkeypatch):
    never_decoded(monkeypatch)
    src, tgt, sw = text_setup(90)
    before = keys_map(src)
    r = run(src, tgt, sw, retire="keep", copy_chunk=20)
    assert r.ok, r.error
    assert tgt.calls.count("edit-text") == 5  # ceil(90 / 20) slices, all before the one commit
    assert tgt.calls.index("commit") > len(tgt.calls) - 1 - tgt.calls[::-1].index("edit-text")
    assert tgt.commits == ["confirmed", "confirm", "confirmed", "confirm"]
    assert keys_map(tgt) == before and r.copied == 90 and r.verified == 90
    assert r.source_check == r.target_check == "digest"
    assert "edit-config" in r.phases[1].steps and "decode+edit-config" not in r.phases[1].steps


def test_the_strategy_follows_what_a_node_declares_not_the_methods_it_happens_to_have():
    class Undeclared(TextNode):
        features = frozenset()  # every method is there, no feature declared

    src = Undeclared("nat1", MemoryProvider(table={s.key: s for s in sessions(30)}))
    tgt = Undeclared("nat2", MemoryProvider())
    r = run(src, tgt, FakeSteering("nat1"), retire="keep", copy_chunk=20)
    assert r.ok, r.error
    assert "edit-text" not in tgt.calls and "decode+edit-config" not in r.phases[1].steps
    assert r.source_check != "digest"  # no nat-statistics declared: verify read the table
    assert keys_map(tgt) == keys_map(src) and r.copied == 30


def test_forwarded_text_carries_handshake_states_as_read():
    """The controller writes what it read; the NAT node writes handshakes as ESTABLISHED (agent.provider.as_written)."""
    table = [replace(s, tcp_state=st) for s, st in zip(sessions(4), ["SYN_SENT", "SYN_RECV", "SYN_SENT2", "TIME_WAIT"])]
    src, tgt, sw = text_setup(0, table)
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert sorted(s.tcp_state for s in tgt.provider.list().sessions) == ["SYN_RECV", "SYN_SENT", "SYN_SENT2", "TIME_WAIT"]


def test_a_reply_in_another_form_is_decoded_and_copied_all_the_same():
    src, tgt, sw = text_setup(30)

    def spaced(source: str = "running", on_chunk=None, keep: bool = True) -> TableReply:
        body = CODEC.encode_xml(src.get_sessions(source), root=None).decode().replace("</nat-session>", "</nat-session>\n")
        return tapped(TableReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="1"><data>{body}</data></rpc-reply>', CODEC), on_chunk, keep=keep)
    src.read_table = spaced
    r = run(src, tgt, sw, retire="keep", copy_chunk=10)
    assert r.ok, r.error
    assert "edit-text" not in tgt.calls and tgt.calls.count("edit-config:candidate") == 3
    assert keys_map(tgt) == keys_map(src) and r.copied == 30


@pytest.mark.parametrize("setup_copy", [counting_setup, text_setup], ids=["streamed", "forwarded"])
def test_a_copy_refused_by_the_target_discards_the_candidate_and_keeps_traffic(setup_copy):
    src, tgt, sw = setup_copy(50)
    tgt.fail["edit-config:candidate"] = ControllerError("candidate refused")
    r = run(src, tgt, sw, copy_chunk=10)
    assert not r.ok and r.failed_phase == "copy" and "candidate refused" in r.error
    assert "discard" in tgt.calls and "commit" not in tgt.calls
    assert keys_map(tgt) == {} and sw.moves == [] and r.traffic_on == "nat1"


def test_forwarded_copy_of_a_foreign_address_commits_nothing():
    src, tgt, sw = text_setup(30)
    m = Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", lambda: tgt, public={"203.0.113.9"}), sw, MigrateOptions(copy_chunk=10))
    r = m.run()
    assert not r.ok and r.failed_phase == "copy" and "does not own" in r.error and "203.0.113.1" in r.error
    assert "edit-text" not in tgt.calls and "commit" not in tgt.calls
    assert keys_map(tgt) == {} and sw.moves == []


def test_a_failure_after_a_forwarded_commit_removes_every_copied_session_by_key():
    src, tgt, sw = text_setup(40)
    own = sessions(3, base_port=40000, first=5000)
    # The target gains sessions of its own after preflight: the rollback must remove only the copied ones.
    tgt.hooks["commit"] = lambda: tgt.provider.apply(own)
    sw.fail_to = "nat2"
    r = run(src, tgt, sw)
    assert not r.ok and r.failed_phase == "switch"
    assert set(keys_map(tgt)) == {s.key for s in own}
    assert "the 40 sessions copied to it removed" in r.node_state["nat2"]
    assert len(keys_map(src)) == 40 and r.traffic_on == "nat1"


def test_unequal_digests_after_a_forwarded_copy_fall_back_to_decoding_and_reconcile():
    src, tgt, sw = text_setup(10)
    src.drop_events = True  # a session created after the snapshot is never announced
    late = sessions(1, base_port=29500)[0]
    tgt.hooks["commit"] = lambda: src.provider.apply([late])
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.source_check == "read" and r.reconciled == 1
    assert keys_map(tgt) == keys_map(src)


def test_a_reply_spoiled_only_near_its_end_is_forwarded_then_decoded_and_still_copied_whole():
    src, tgt, sw = text_setup(40)

    def late_comment(source: str = "running", on_chunk=None, keep: bool = True) -> TableReply:
        body = CODEC.encode_xml(src.get_sessions(source), root=None).decode()
        cut = body.rindex("<nat-session ")
        return tapped(TableReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="1"><data>{body[:cut]}<!-- x -->{body[cut:]}</data></rpc-reply>', CODEC), on_chunk, keep=keep)
    src.read_table = late_comment
    r = run(src, tgt, sw, retire="keep", copy_chunk=10)
    assert r.ok, r.error
    assert tgt.calls.count("edit-text") >= 1  # the plain slices went as text first
    assert "decode+edit-config" in r.phases[1].steps  # then the whole reply, decoded
    assert keys_map(tgt) == keys_map(src) and r.copied == 40 and r.verified == 40



def test_the_target_gets_slices_while_the_sources_reply_still_arrives():
    """The pipeline: the first slice is written into the target before the source's read has returned."""
    src, tgt, sw = text_setup(200)
    written = threading.Event()
    real_edit = tgt.edit_text

    def edit_text(entries, target="candidate"):
        written.set()
        real_edit(entries, target)
    tgt.edit_text = edit_text
    seen = {}

    def read_table(source="running", on_chunk=None, keep=True):
        reply = TextNode.read_table(src, source, on_chunk, keep)
        # Every chunk is out, the reply not yet returned: a slice must already be on its way.
        seen["written"] = written.wait(5)
        return reply
    src.read_table = read_table
    r = run(src, tgt, sw, retire="keep", copy_chunk=50)
    assert r.ok, r.error
    assert seen["written"] is True
    assert keys_map(tgt) == keys_map(src) and r.copied == 200


def test_chunks_that_differ_from_the_reply_commit_nothing():
    src, tgt, sw = text_setup(40)

    def read_table(source="running", on_chunk=None, keep=True):
        reply = TextNode.read_table(src, source, None)
        data = reply.raw.encode()
        on_chunk(data[: len(data) // 2])  # the rest of the message never came through the tap
        reply.tapped = True
        return reply
    src.read_table = read_table
    r = run(src, tgt, sw, copy_chunk=10)
    assert not r.ok and r.failed_phase == "copy" and "differs from the chunks" in r.error
    assert "commit" not in tgt.calls and "discard" in tgt.calls
    assert keys_map(tgt) == {} and sw.moves == [] and r.traffic_on == "nat1"


def expire(nodes, victims, clock=None):
    """A hook: ``victims`` time out on every node (their timers ran out), as a large table's oldest entries do during a long verify."""
    def hook():
        if clock is not None:
            clock[0] += 100.0  # their 30 s ran out meanwhile
        for node in nodes:
            node.provider.delete([s.key for s in victims])
    return hook


@pytest.fixture
def clock(monkeypatch):
    """perf_counter moved on by the seconds added to the returned list (a long read, without waiting for it)."""
    import time
    real, offset = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])
    return offset


def aging_setup(n: int, short: int):
    """``n`` sessions, the first ``short`` of them with 30 s left, the rest with a day."""
    table = [replace(s, timeout=30 if i < short else 86400) for i, s in enumerate(sessions(n))]
    src = CountingNode("nat1", MemoryProvider(table={s.key: s for s in table}))
    return src, CountingNode("nat2", MemoryProvider()), FakeSteering("nat1"), table[:short]


@pytest.mark.parametrize("lost_events", [True, False], ids=["source-re-read", "snapshot-and-events"])
def test_sessions_that_time_out_on_both_nodes_during_verify_are_not_missing(clock, lost_events):
    # At 1,000,000 sessions a benchmark table's oldest entries timed out while
    # verify read the two tables a minute apart: each one was reported missing.
    src, tgt, sw, victims = aging_setup(20, 6)
    src.drop_events = lost_events  # lost: the source's digest differs too, and it is re-read
    late = replace(sessions(1, base_port=29500)[0], timeout=86400)
    tgt.hooks["commit"] = lambda: src.provider.apply([late])
    if not lost_events:
        # Only the target's digest differs (it lost one copied session), so its table is read.
        tgt.hooks["set-admission:False"] = lambda: tgt.provider.delete([sessions(20)[10].key])
    # Before the target's table is read, the six short ones time out on both nodes.
    tgt.hooks["get-config:running"] = expire((src, tgt), victims, clock)
    # Written back (as verify did before), they had no time left: gone again
    # before the target's re-read, and reported "6 missing on the target".
    tgt.hooks["edit-config:running"] = lambda: tgt.hooks.setdefault("get-config:running", expire((tgt,), victims))
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.expired == 6 and r.reconciled == 1 and r.verified == 20 + 1 - 6
    assert keys_map(tgt) == keys_map(src)
    assert "ended on the source" in " ".join(p.detail for p in r.phases)


def test_a_session_missing_on_the_target_but_alive_on_the_source_is_written(clock):
    src, tgt, sw, victims = aging_setup(20, 4)
    tgt.hooks["set-admission:False"] = lambda: tgt.provider.delete([sessions(20)[10].key])
    # The target alone loses four short-lived copies while its table is read: the source still holds them.
    tgt.hooks["get-config:running"] = expire((tgt,), victims, clock)
    r = run(src, tgt, sw, retire="keep")
    assert r.ok, r.error
    assert r.expired == 0 and r.reconciled == 5 and r.verified == 20
    assert "re-read-source" in r.phases[4].steps  # their timers said "ended"; the source said otherwise
    assert keys_map(tgt) == keys_map(src)


def test_a_reconciled_session_whose_time_ran_out_is_not_missing():
    from natmig.controller.migrate import ran_out
    s = sessions(1)[0]
    assert ran_out(replace(s, timeout=2), 10.0, 13.0) and not ran_out(replace(s, timeout=2), 10.0, 12.5)
    assert not ran_out(replace(s, timeout=None), 0.0, 1e9)


def test_a_slow_target_holds_back_the_sources_reply_instead_of_queueing_it_here(monkeypatch):
    """At most WRITES_AHEAD slices wait for the target, at most CHUNKS_QUEUED chunks for the copy: nothing deadlocks, all arrives."""
    import time as _time

    from natmig.controller import chunkfeed, migcopytext as mig

    monkeypatch.setattr(mig, "WRITES_AHEAD", 1)
    monkeypatch.setattr(chunkfeed, "CHUNKS_QUEUED", 2)
    src, tgt, sw = text_setup(300)
    busy, most = [0], [0]
    real_edit = tgt.edit_text
    lock = threading.Lock()

    def slow_edit(entries, target="candidate"):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        _time.sleep(0.01)
        try:
            real_edit(entries, target)
        finally:
            with lock:
                busy[0] -= 1
    tgt.edit_text = slow_edit
    r = run(src, tgt, sw, retire="keep", copy_chunk=20)
    assert r.ok, r.error
    assert most[0] == 1 and tgt.calls.count("edit-text") >= 300 // 20
    assert keys_map(tgt) == keys_map(src) and r.copied == 300


def test_a_source_read_that_fails_half_way_through_a_full_queue_fails_the_copy_and_hangs_nothing(monkeypatch):
    from natmig.controller import chunkfeed, migcopytext as mig

    monkeypatch.setattr(chunkfeed, "CHUNKS_QUEUED", 2)
    src, tgt, sw = text_setup(200)

    def read_table(source="running", on_chunk=None, keep=True):
        reply = TextNode.read_table(src, source, None)
        data = reply.raw.encode()
        for i in range(0, len(data) // 2, 300):
            on_chunk(data[i:i + 300])
        raise ControllerError("nat1: get-config: no reply in time (the RPC timeout is 30 s; a larger table needs a longer one)")
    src.read_table = read_table
    r = run(src, tgt, sw, copy_chunk=20)
    assert not r.ok and r.failed_phase == "copy" and "RPC timeout is 30 s" in r.error
    assert "commit" not in tgt.calls and keys_map(tgt) == {} and r.traffic_on == "nat1"
