"""A migration the agents hold, over in-memory nodes: exclusive, and safe when the controller dies anywhere.

"The controller dies" is modelled as every session to both nodes dropping at
one call (nothing the controller would still do reaches a node or the
switch); then each agent does what RFC 6241 8.4 makes it do by itself: it
rolls back its pending confirmed commit when the timeout passes.  The real
thing (SIGKILL of `natmig migrate` with agents in namespaces and live flows)
is tests/functional/test_faults.py.
"""

from __future__ import annotations

import pytest

from natmig.agent.provider import MemoryProvider
from natmig.controller.migrate import Endpoint, MigrateOptions, Migration
from natmig.controller.ncerrors import SessionLost
from natmig.controller.steering import SteeringError

from .controller_fakes import FakeNode, FakeSteering, sessions


def setup(n: int = 50):
    src = FakeNode("nat1", MemoryProvider(table={s.key: s for s in sessions(n)}))
    tgt = FakeNode("nat2", MemoryProvider(table={}))
    return src, tgt, FakeSteering("nat1")


def migration(src, tgt, sw, **opts) -> Migration:
    return Migration(Endpoint("nat1", src.session), Endpoint("nat2", tgt.session), sw, MigrateOptions(**opts))


def mapping(node):
    return {s.key: (s.translated_address, s.translated_port) for s in node.provider.list().sessions}


class Died(Exception):
    """Raised into the controller where it 'dies' (after that, nothing of it reaches a node)."""


def kill_at(src, tgt, sw, node, op: str, nth: int = 1):
    """Make the controller die at the ``nth`` call of ``op`` on ``node``: that call is not performed."""
    seen = {"n": 0}
    sessions_of = []

    real_session = {id(src): src.session, id(tgt): tgt.session}

    def tracking(base):
        def open_session():
            s = real_session[id(base)]()
            sessions_of.append(s)
            return s
        return open_session

    def die():
        for s in sessions_of:
            s.closed = True
        # the switch is no longer driven either
        sw.point_to = lambda nat: (_ for _ in ()).throw(SteeringError("controller is dead"))

    def hook_factory():
        def hook():
            seen["n"] += 1
            if seen["n"] == nth:
                die()
                raise SessionLost("controller died")
            # re-arm for the next call of the same operation
            for s in sessions_of:
                if s.name == node.name:
                    s.hooks[op] = hook
        return hook

    node.hooks[op] = hook_factory()
    return tracking(src), tracking(tgt)


POINTS = [
    # (node, operation, nth call): every RPC boundary of the migration
    ("nat2", "lock:running", 1),
    ("nat2", "edit-config:candidate", 1),   # inside the copy
    ("nat2", "commit", 1),                  # the copy's confirmed commit
    ("nat1", "set-admission:False", 1),     # the freeze
    ("nat1", "commit", 1),                  # the freeze's confirmed commit
    ("nat2", "commit", 2),                  # confirming the copy
    ("nat2", "set-admission:False", 1),     # the target's hold
    ("nat2", "commit", 3),                  # the hold's confirmed commit
    ("switch", "point_to", 1),              # at the switch
    ("nat2", "get-statistics", 1),          # verify
    ("nat2", "set-admission:True", 1),      # admit
    ("nat2", "commit", 4),                  # admit's confirm
    ("nat1", "cancel-commit", 1),           # the source's reopening
    ("nat1", "delete:running", 1),          # retire
]


@pytest.mark.parametrize("where,op,nth", POINTS, ids=[f"{w}-{o}-{n}" for w, o, n in POINTS])
def test_a_controller_dying_anywhere_leaves_one_serving_nat_that_holds_every_session(where, op, nth):
    src, tgt, sw = setup(50)
    before = mapping(src)
    if where == "switch":
        opened: list = []
        real_point = sw.point_to

        def open_src():
            s = src.session()
            opened.append(s)
            return s

        def open_tgt():
            s = tgt.session()
            opened.append(s)
            return s

        def point_then_die(nat):
            real_point(nat)  # the bundle was sent: the switch moved
            for s in opened:
                s.closed = True
            sw.point_to = lambda n: (_ for _ in ()).throw(SteeringError("controller is dead"))
            raise Died()
        sw.point_to = point_then_die
        m = Migration(Endpoint("nat1", open_src), Endpoint("nat2", open_tgt), sw, MigrateOptions(verify_source="read"))
        with pytest.raises(Died):
            m.run()
    else:
        node = src if where == "nat1" else tgt
        open_src, open_tgt = kill_at(src, tgt, sw, node, op, nth)
        m = Migration(Endpoint("nat1", open_src), Endpoint("nat2", open_tgt), sw, MigrateOptions())
        m.run()
    # The agents on their own: confirm-timeout passes, pending commits roll back; locks went with the sessions.
    src.rollback()
    tgt.rollback()
    on = sw.active()
    carrier, other = (src, tgt) if on == "nat1" else (tgt, src)
    assert carrier.provider.admission() is True and other.provider.admission() is True
    assert src.shared["locks"] == {} and tgt.shared["locks"] == {}
    held = mapping(carrier)
    assert all(held.get(k) == v for k, v in before.items()), f"traffic on {on}: sessions missing there"
    if on == "nat1":
        # Traffic never moved, or was moved back: no copy is left on the target by itself
        # unless it had been confirmed (then it equals the source's: harmless, and recover removes it).
        assert mapping(tgt) in ({}, before)


def test_a_second_migration_is_refused_at_once_naming_the_holder_and_changes_nothing():
    src, tgt, sw = setup(40)
    before = mapping(src)
    second: dict = {}

    def start_second():
        second["report"] = migration(src, tgt, sw).run()
        second["tgt_map"] = mapping(tgt)

    tgt.hooks["commit"] = start_second  # while the first holds both nodes, mid-copy
    first = migration(src, tgt, sw).run()
    assert first.ok, first.error
    r2 = second["report"]
    assert not r2.ok and r2.failed_phase == "preflight"
    assert "in use" in r2.error and "locked by session" in r2.error
    # The second changed nothing: the first's copy is intact and it moved every session.
    assert mapping(tgt) == before and mapping(src) == {}
    assert sw.active() == "nat2" and sw.moves == ["nat2"]
    assert src.provider.admission() and tgt.provider.admission()


def test_a_lock_held_by_another_writer_refuses_the_migration_before_any_change():
    src, tgt, sw = setup(10)
    operator = src.session()
    operator.lock("running")
    r = migration(src, tgt, sw).run()
    assert not r.ok and r.failed_phase == "preflight" and "source nat1 is in use" in r.error
    # the target's locks, taken at the same time, were let go again
    assert tgt.shared["locks"] == {} and src.shared["locks"] == {"running": id(operator)}
    assert mapping(tgt) == {} and sw.moves == []


def test_a_lost_event_stream_aborts_before_the_switch():
    src, tgt, sw = setup(20)
    opened = []

    def open_src():
        s = src.session()
        opened.append(s)
        return s

    def lose_events():
        opened[1].closed = True  # the second session to the source carries the notifications
    src.hooks["set-admission:False"] = lose_events
    r = Migration(Endpoint("nat1", open_src), Endpoint("nat2", tgt.session), sw, MigrateOptions()).run()
    assert not r.ok and r.failed_phase == "catch-up" and "event stream" in r.error
    assert sw.moves == [] and sw.active() == "nat1"
    assert src.provider.admission() and tgt.provider.admission() and mapping(tgt) == {}
    assert src.shared["pending"] is None and tgt.shared["pending"] is None


def test_the_report_reads_back_traffic_and_admission_instead_of_assuming_them():
    src, tgt, sw = setup(10)
    # The source's agent refuses to reopen (a fault in the node); the move stands.
    src.fail["cancel-commit"] = SessionLost("nat1 went away")
    r = migration(src, tgt, sw).run()
    assert not r.ok and r.failed_phase == "retire"
    assert r.traffic_on == "nat2" and r.readback["nat2"] == {"admits": True, "sessions": 10, "carries_traffic": True}
    assert r.readback["nat1"]["admits"] is False and "REFUSES new sessions" in r.node_state["nat1"]
    assert any("natmig recover" in n for n in r.notes)


def die_at(src, tgt, sw, where: str, op: str, nth: int) -> None:
    """Run a migration whose controller dies at (where, op, nth); nothing is rolled back yet."""
    if where == "switch":
        opened: list = []
        real_point = sw.point_to

        def opener(base):
            def open_():
                s = base.session()
                opened.append(s)
                return s
            return open_

        def point_then_die(nat):
            real_point(nat)
            for s in opened:
                s.closed = True
            sw.point_to = real_point  # the switch itself works; only its driver died
            raise Died()
        sw.point_to = point_then_die
        with pytest.raises(Died):
            Migration(Endpoint("nat1", opener(src)), Endpoint("nat2", opener(tgt)), sw, MigrateOptions(verify_source="read")).run()
        return
    node = src if where == "nat1" else tgt
    open_src, open_tgt = kill_at(src, tgt, sw, node, op, nth)
    Migration(Endpoint("nat1", open_src), Endpoint("nat2", open_tgt), sw, MigrateOptions()).run()


@pytest.mark.parametrize("where,op,nth", POINTS, ids=[f"{w}-{o}-{n}" for w, o, n in POINTS])
def test_recover_after_a_controller_died_anywhere_finishes_or_undoes_at_once(where, op, nth):
    from natmig.controller.recover import recover

    src, tgt, sw = setup(30)
    before = mapping(src)
    die_at(src, tgt, sw, where, op, nth)
    # a working switch driver for recovery (the dead controller's was replaced by a raising one)
    sw.point_to = FakeSteering.point_to.__get__(sw)
    for n in (src, tgt):
        n.hooks.clear()
    r = recover(Endpoint("nat1", src.session), Endpoint("nat2", tgt.session), sw, retire="delete")
    assert r.ok, r.text()
    on = sw.active()
    assert r.traffic_on == on == r.found_traffic_on  # recovery never moves traffic
    carrier, other = (src, tgt) if on == "nat1" else (tgt, src)
    assert carrier.provider.admission() and other.provider.admission()
    assert src.shared["pending"] is None and tgt.shared["pending"] is None  # nothing left to roll back later
    assert mapping(carrier) == before
    assert mapping(other) == {}  # the copy (or, after the move, the retired source) holds nothing
    assert {v.name: v.admits for v in r.now} == {"nat1": True, "nat2": True}
    assert src.shared["locks"] == {} and tgt.shared["locks"] == {}


def test_recover_is_refused_while_a_migration_holds_the_nodes():
    from natmig.controller.recover import recover

    src, tgt, sw = setup(10)
    seen = {}

    def recover_now():
        seen["r"] = recover(Endpoint("nat1", src.session), Endpoint("nat2", tgt.session), sw)
    tgt.hooks["commit"] = recover_now
    first = migration(src, tgt, sw).run()
    assert first.ok, first.error
    r = seen["r"]
    assert not r.ok and "in use" in r.error and r.did == []
    assert "NOT consistent" in r.text()


def test_a_target_holding_conflicting_sessions_is_refused_with_the_fix_and_nothing_committed():
    from dataclasses import replace

    src, tgt, sw = setup(10)
    squatter = replace(sessions(1)[0], translated_port=29999)  # the source's first key, another public port
    tgt.provider.apply([squatter])
    r = migration(src, tgt, sw).run()
    assert not r.ok and r.failed_phase == "copy" and "conflict" in r.error
    assert any("natmig recover" in n and "conflict" in n for n in r.notes)
    assert mapping(tgt) == {squatter.key: ("203.0.113.1", 29999)} and sw.moves == []
    assert src.provider.admission() and tgt.provider.admission()


def test_a_copy_that_rolled_back_before_its_confirm_fails_before_the_switch_saying_why():
    src, tgt, sw = setup(10)
    # The agent's timer fires between the copy's commit and its confirm (a confirm-timeout too short).
    def second_commit():
        tgt.hooks["commit"] = tgt.rollback
    tgt.hooks["commit"] = second_commit
    r = migration(src, tgt, sw, confirm_timeout=1).run()
    assert not r.ok and r.failed_phase == "catch-up" and "--confirm-timeout (1 s)" in r.error
    assert sw.moves == [] and mapping(tgt) == {} and src.provider.admission() and tgt.provider.admission()


def test_a_rerun_while_a_dead_migrations_copy_is_pending_fails_naming_recover():
    src, tgt, sw = setup(10)
    open_src, open_tgt = kill_at(src, tgt, sw, tgt, "commit", 2)  # dies before confirming the copy
    Migration(Endpoint("nat1", open_src), Endpoint("nat2", open_tgt), sw, MigrateOptions()).run()
    assert tgt.shared["pending"] is not None  # the copy waits for its confirm or its timeout
    for n in (src, tgt):
        n.hooks.clear()
    r = migration(src, tgt, sw).run()
    assert not r.ok and r.failed_phase == "copy"
    assert any("interrupted migration is still pending" in n and "natmig recover" in n for n in r.notes), r.notes
    assert sw.moves == [] and src.provider.admission()


def test_recover_of_the_wrong_pair_says_which_migration_is_pending():
    from natmig.controller.recover import recover

    src, tgt, sw = setup(10)
    open_src, open_tgt = kill_at(src, tgt, sw, tgt, "commit", 2)  # the copy stays pending on nat2
    Migration(Endpoint("nat1", open_src), Endpoint("nat2", open_tgt), sw, MigrateOptions()).run()
    for n in (src, tgt):
        n.hooks.clear()
    r = recover(Endpoint("nat2", tgt.session), Endpoint("nat1", src.session), sw)  # nat2 -> nat1: not the one pending
    assert not r.ok and "another migration than nat2 -> nat1" in r.error
    assert tgt.shared["pending"] is not None  # nothing was done to it
