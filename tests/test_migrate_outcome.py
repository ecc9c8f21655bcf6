"""The migration's outcome (and so `natmig migrate`'s exit status) comes from what was read back at the end."""

from __future__ import annotations

from natmig.controller.migrate import Endpoint, MigrateOptions, Migration
from natmig.controller.ncerrors import SessionLost
from natmig.controller.report import MigrationReport

from .test_controller_faults import kill_at, migration, setup


def report(**kw: object) -> MigrationReport:
    r = MigrationReport("nat1", "nat2", failed_phase="catch-up", traffic_on="nat1", target_sessions_before=0,
                        readback={"nat1": {"admits": True, "sessions": 10, "carries_traffic": True},
                                  "nat2": {"admits": True, "sessions": 0, "carries_traffic": False}})
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_outcome_from_the_read_back_state() -> None:
    assert report(ok=True, failed_phase=None).outcome == "ok"
    assert report().outcome == "unchanged"
    assert report(failed_phase="preflight", readback={}).outcome == "unchanged"  # preflight changes nothing
    assert report(traffic_on="nat2").outcome == "attention"
    assert report(traffic_on="unknown").outcome == "attention"
    closed = report()
    closed.readback["nat1"]["admits"] = False
    assert closed.outcome == "attention"
    copied = report()
    copied.readback["nat2"]["sessions"] = 10  # a copy remains on the target
    assert copied.outcome == "attention"
    unread = report()
    del unread.readback["nat2"]
    assert unread.outcome == "attention"
    assert '"outcome": "unchanged"' in report().to_json()


def test_a_clean_rollback_is_unchanged() -> None:
    src, tgt, sw = setup(20)
    opened: list = []

    def open_src():
        s = src.session()
        opened.append(s)
        return s

    def lose_events():
        opened[1].closed = True
    src.hooks["set-admission:False"] = lose_events
    r = Migration(Endpoint("nat1", open_src), Endpoint("nat2", tgt.session), sw, MigrateOptions()).run()
    assert not r.ok and r.failed_phase == "catch-up"
    assert r.outcome == "unchanged", r.node_state


def test_a_failed_retire_needs_attention() -> None:
    src, tgt, sw = setup(10)
    src.fail["cancel-commit"] = SessionLost("nat1 went away")
    r = migration(src, tgt, sw).run()
    assert r.failed_phase == "retire" and r.outcome == "attention"


def test_a_controller_cut_off_before_confirming_the_copy_needs_attention() -> None:
    src, tgt, sw = setup(10)
    open_src, open_tgt = kill_at(src, tgt, sw, tgt, "commit", 2)
    r = Migration(Endpoint("nat1", open_src), Endpoint("nat2", open_tgt), sw, MigrateOptions()).run()
    assert not r.ok and tgt.shared["pending"] is not None
    assert r.outcome == "attention", r.node_state


def test_each_outcome_has_one_exit_status_and_says_what_to_do_next() -> None:
    from natmig.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, outcome_exit

    said: list[str] = []
    assert outcome_exit("ok", "U", "A", said.append) == EXIT_OK and said == []
    assert outcome_exit("unchanged", "read back: as before", "A", said.append) == EXIT_FAILED
    assert said == ["natmig migrate: nothing was changed (read back: as before)"]
    assert outcome_exit("attention", "U", "run `natmig recover`", said.append) == EXIT_ATTENTION
    assert said[-1] == "natmig migrate: the state needs attention: run `natmig recover`"
    # An outcome this client does not know (a newer controller's) is never taken for success.
    assert outcome_exit("half-done", "U", "A", said.append) == EXIT_ATTENTION
