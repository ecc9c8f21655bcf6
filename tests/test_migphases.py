"""The NAT migration as phase objects: their order, the capabilities they declare, the one choice of a copy strategy."""

from __future__ import annotations

from typing import Any

import pytest

from natmig.agent.provider import MemoryProvider
from natmig.controller.migcopy import choose_copy
from natmig.controller.migcopytext import ForwardedText
from natmig.controller.migrate import Endpoint, MigrateOptions, Migration, phases
from natmig.controller.migstrategy import Planned, Streamed
from natmig.controller.nodeproto import ALL_FEATURES, CHUNKS, STATISTICS, TABLE_TEXT, TEXT_EDIT
from natmig.controller.phase import Phase, missing_needs
from natmig.controller.txn import CANDIDATE, CONFIRMED_COMMIT

from .controller_fakes import FakeNode, FakeSteering, sessions


def client(*features: str) -> Any:
    """A client object whose type declares ``features`` (all the choice reads)."""
    class Declared:
        pass
    Declared.features = frozenset(features)
    return Declared()


@pytest.mark.parametrize("src, tgt, idle, chosen", [
    ((TABLE_TEXT, CHUNKS), (TEXT_EDIT,), True, ForwardedText),
    ((TABLE_TEXT, CHUNKS), (TEXT_EDIT,), False, Planned),  # a target holding sessions is always planned against
    ((TABLE_TEXT, CHUNKS), (), True, Streamed),  # the target cannot take text
    ((TABLE_TEXT,), (STATISTICS,), True, Planned),
    ((CHUNKS,), (), True, Streamed),
    ((CHUNKS,), (), False, Planned),
    ((), (), True, Planned),
])
def test_the_copy_follows_the_declared_features_and_whether_the_target_is_idle(src, tgt, idle, chosen):
    assert type(choose_copy(client(*src), client(*tgt), idle)) is chosen
    assert type(choose_copy(client(*ALL_FEATURES), client(*ALL_FEATURES), True)) is ForwardedText


def test_phases_in_order_with_and_without_state():
    assert [p.name for p in phases(MigrateOptions())] == ["preflight", "copy", "catch-up", "switch", "verify", "admit", "retire"]
    assert [p.name for p in phases(MigrateOptions(copy_state=False))] == ["preflight", "switch", "admit", "retire"]


def test_a_migration_without_state_still_needs_confirmed_commits_and_the_candidate():
    # What the preflight checks: its own needs and every later phase's.
    for opt in (MigrateOptions(), MigrateOptions(copy_state=False)):
        assert missing_needs(phases(opt), []) == ["candidate", "confirmed-commit"]
        assert missing_needs(phases(opt), [CANDIDATE, CONFIRMED_COMMIT]) == []


def test_preflight_refuses_an_agent_without_a_capability_a_later_phase_declares():
    class NeedsMore(Phase):
        name = "extra"
        needs = frozenset({"urn:example:capability:rollback-on-error:1.0"})

    src, tgt = FakeNode("nat1", MemoryProvider(table={s.key: s for s in sessions(10)})), FakeNode("nat2", MemoryProvider())
    m = Migration(Endpoint("nat1", lambda: src), Endpoint("nat2", lambda: tgt), FakeSteering("nat1"), MigrateOptions(retire="keep"))
    preflight = m.phases[0]
    preflight.later = [*preflight.later, NeedsMore()]
    r = m.run()
    assert not r.ok and r.failed_phase == "preflight"
    assert "source nat1 does not announce :rollback-on-error" in r.error and r.traffic_on == "nat1"
    assert src.provider.statistics()["sessions"] == 10 and tgt.provider.statistics()["sessions"] == 0
    assert not any(c.startswith("lock") for c in src.calls + tgt.calls)  # refused before anything was locked or written


@pytest.mark.parametrize("seconds", [0, 0.5, 3601, float("inf")])
def test_both_engines_refuse_a_confirm_timeout_out_of_range_with_one_message(seconds: float) -> None:
    from natmig.controller.engine import EngineOptions
    from natmig.controller.migcontext import MigrateOptions
    from natmig.errors import ControllerError

    messages = set()
    for options in (MigrateOptions, EngineOptions):
        with pytest.raises(ControllerError) as e:
            options(confirm_timeout=seconds)
        messages.add(str(e.value))
    assert messages == {f"confirm-timeout: {seconds:g} s is not in 1..3600"}
    assert MigrateOptions(confirm_timeout=3600).confirm_timeout == EngineOptions(confirm_timeout=3600).confirm_timeout == 3600
