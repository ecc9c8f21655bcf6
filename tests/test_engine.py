"""The migration engine between real state agents over SSH on loopback (in this process): success, refusals, faults.

The agents serve examples/lb-binding.yang from memory; the engine learns it
from their yang-library and get-schema.  Nothing here knows a network function.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from natmig.agent.auth import set_password
from natmig.agent.provider import MemoryProvider
from natmig.agent.server import Agent, AgentConfig
from natmig.agent.stateagent import StateAgent
from natmig.codec import default_codec
from natmig.errors import ControllerError
from natmig.controller.engine import (CatchUp, Context, Copy, EngineMigration, EngineOptions, Finish, ForwardedLists, Freeze, NoSwitch, Phase,
                                      Preflight, Verify, WholeLists, default_phases)
from natmig.controller.netconf import NOTIFICATION_CAPABILITY, NodeClient
from natmig.controller.statenode import StateNode
from natmig.statemodel import load_module
from natmig.wire.state import Wire

from .test_statemodel import LB, binding

ROOT = Path(__file__).resolve().parent.parent


class Served:
    """An agent on 127.0.0.1 (free port) on its own event loop thread."""

    def __init__(self, tmp: Path, name: str, module: Path | None = LB) -> None:
        tmp.mkdir(exist_ok=True)
        set_password(tmp / "passwords", "natmig", "secret")
        cfg = AgentConfig(host="127.0.0.1", port=0, host_key=str(tmp / "host_key"), passwords=str(tmp / "passwords"))
        self.agent: Agent = StateAgent(cfg, load_module(module)) if module is not None else Agent(cfg, MemoryProvider(owned={"203.0.113.1"}), default_codec())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(10)
        self.port = self.agent.port
        pub = (tmp / "host_key.pub").read_text().split()
        (tmp / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.tmp, self.name, self.stopped = tmp, name, False

    def client(self) -> NodeClient:
        c = NodeClient.connect("127.0.0.1", self.port, "natmig", password="secret", known_hosts=str(self.tmp / "known_hosts"), timeout=10)
        c.name = self.name
        return c

    def node(self) -> StateNode:
        return StateNode(self.client())

    def load(self, *entries: str) -> None:
        with self.client() as c:
            c.edit_config("".join(entries), target="running")

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.loop.call_soon_threadsafe(self.agent.close)
            time.sleep(0.1)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Served, Served]]:
    a, b = Served(tmp_path / "lb1", "lb1"), Served(tmp_path / "lb2", "lb2")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def migration(a: Served, b: Served, phases: list[Phase] | None = None, **opts: object) -> EngineMigration:
    return EngineMigration(a.node, b.node, a.name, b.name, EngineOptions(**opts), phases)  # type: ignore[arg-type]


def entries(n: int, base: int = 0) -> list[str]:
    return [binding(f"192.0.2.{i % 200 + 1}", 40000 + base + i, snat=1024 + base + i, idle_timeout=300) for i in range(n)]


def test_the_state_moves_and_the_report_is_what_the_nodes_say(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(300), '<backend xmlns="urn:natmig:yang:example:lb-binding"><address>198.51.100.10</address><port>80</port><weight>5</weight></backend>')
    before = a.node().statistics()
    r = migration(a, b).run()
    assert r.ok and r.outcome == "ok", r.text()
    assert r.modules == ["lb-binding@2026-12-03"]
    assert r.copied == {"lb-binding:backend": 1, "lb-binding:binding": 300}
    assert r.switch.startswith("none")
    assert r.readback["lb2"].tables == before  # same sizes and digests, as the target reports them
    assert r.readback["lb1"].tables["lb-binding:binding"][0] == 0 and r.readback["lb1"].admission is True
    assert r.readback["lb2"].admission is True
    assert "no traffic was moved" in r.text()
    verify = next(p for p in r.phases if p.name == "verify")
    assert "by the target's own digest" in verify.detail  # lb2 held nothing: its digest is the read-back
    # retire keep: the source keeps its entries, and is open again
    r2 = migration(b, a, retire="keep").run()
    assert r2.ok and r2.readback["lb2"].tables == before and r2.readback["lb1"].tables == before


def test_a_target_that_held_entries_of_its_own_is_verified_by_reading_it_back(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(30))
    b.load(binding("203.0.113.9", 6000, snat=3000))  # its own, in no conflict with lb1's
    r = migration(a, b).run()
    assert r.ok, r.text()
    verify = next(p for p in r.phases if p.name == "verify")
    # backend: empty on both, so by digest; binding: lb2 had one of its own, so read back
    assert verify.detail.endswith("by the target's digest (lb-binding:backend) or read back"), verify.detail
    assert r.readback["lb2"].tables["lb-binding:binding"][0] == 31


def test_a_conflict_with_the_targets_own_entries_is_refused_and_nothing_changes(pair: tuple[Served, Served]) -> None:
    a, b = pair
    # backend comes first and is written into the target's candidate before binding is refused
    a.load(*entries(50), '<backend xmlns="urn:natmig:yang:example:lb-binding"><address>198.51.100.10</address><port>80</port></backend>')
    b.load(binding("203.0.113.9", 5555, snat=1030))  # the same backend and source port as one of lb1's
    src_before, tgt_before = a.node().statistics(), b.node().statistics()
    r = migration(a, b).run()
    assert not r.ok and r.failed_phase == "copy"
    assert 'unique "backend-address backend-port snat-port" violated' in r.error and "binding[203.0.113.9 5555]" in r.error
    assert r.readback["lb1"].tables == src_before and r.readback["lb1"].admission is True
    assert r.readback["lb2"].tables == tgt_before
    # The copy ran while lb1 served: it failed before any freeze, and only the target's candidate is undone.
    assert [p.name for p in r.phases] == ["preflight", "copy"] and r.undone == ["lb2: candidate discarded"]
    # the target's candidate was discarded: the next migration can lock it
    with b.client() as c:
        c.lock("candidate")


def test_a_node_locked_by_another_session_is_refused_in_preflight(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(5))
    other = b.client()
    other.lock("running")
    try:
        r = migration(a, b).run()
    finally:
        other.close()
    assert not r.ok and r.failed_phase == "preflight"
    assert "target lb2 is in use" in r.error and "locked by session" in r.error
    assert r.readback["lb1"].tables["lb-binding:binding"][0] == 5 and r.readback["lb1"].admission is True
    assert r.outcome == "unchanged"


def test_refused_in_preflight_while_another_migration_has_frozen_the_source_is_still_unchanged(pair: tuple[Served, Served]) -> None:
    """What is read back then is the other migration's doing: this one wrote nothing (exit 1, not 3)."""
    a, b = pair
    a.load(*entries(5))
    with a.node() as other:
        other.client.lock("running")
        other.set_admission(False, target="running")  # the winner froze it
        r = migration(a, b).run()
        assert not r.ok and r.failed_phase == "preflight" and "locked by session" in r.error
        assert r.readback["lb1"].admission is False and r.outcome == "unchanged", r.text()
        other.set_admission(True, target="running")


def test_a_source_already_closed_is_refused_with_the_recover_hint(pair: tuple[Served, Served]) -> None:
    a, b = pair
    with a.client() as c:
        StateNode(c).set_admission(False, "running")
    r = migration(a, b, recover_hint="natmig recover --inventory inv.toml").run()
    assert not r.ok and "refuses new entries already" in r.error and "natmig recover" in r.error


def test_agents_that_serve_different_modules_or_no_state_are_refused(tmp_path: Path) -> None:
    a = Served(tmp_path / "lb", "lb")
    nat = Served(tmp_path / "nat", "nat", module=ROOT / "yang" / "nat-session.yang")
    plain = Served(tmp_path / "plain", "plain", module=None)
    # An agent of nat-session alone (as natmig's NAT agent was before it implemented natmig-state).
    from natmig.agent.monitoring import Catalog, SchemaEntry
    from natmig.agent.server import OPTIONAL_CAPABILITIES
    sch = default_codec().schema
    plain.agent.catalog = Catalog([SchemaEntry(sch.module, sch.revision, sch.namespace, sch.yang_text())], [], OPTIONAL_CAPABILITIES)
    try:
        r = migration(a, nat).run()
        assert not r.ok and "do not serve the same state modules" in r.error
        assert "lb-binding: lb has 2026-12-03, nat has none" in r.error
        r = migration(a, plain).run()
        assert not r.ok and "plain: the agent does not implement natmig-state" in r.error
    finally:
        for s in (a, nat, plain):
            s.stop()


class _StopTarget(Phase):
    name = "fault"

    def __init__(self, served: Served) -> None:
        self.served = served

    def run(self, ctx: Context) -> str:
        self.served.stop()
        return "target stopped"


def test_the_target_dying_mid_migration_leaves_the_source_as_it_was(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(40))
    before = a.node().statistics()
    r = migration(a, b, [Preflight(), Freeze(), _StopTarget(b), Copy(WholeLists()), Verify(), NoSwitch()]).run()
    assert not r.ok and r.failed_phase == "copy"
    assert r.readback["lb1"].tables == before and r.readback["lb1"].admission is True
    assert r.readback["lb2"].error is not None  # not read back: it is gone, and the report says so


class _ControllerDies(Phase):
    name = "crash"

    def run(self, ctx: Context) -> str:
        raise SystemExit("the controller dies here")  # not an Exception: no undo runs, as when the process is killed


@pytest.mark.parametrize("serving", [True, False], ids=["copy-while-serving", "frozen-copy"])
def test_a_controller_dead_after_the_copy_is_undone_by_the_agents_themselves(pair: tuple[Served, Served], serving: bool) -> None:
    a, b = pair
    a.load(*entries(40))
    before = a.node().statistics()
    order: list[Phase] = [Copy(WholeLists()), Freeze()] if serving else [Freeze(), Copy(WholeLists())]
    m = migration(a, b, [Preflight(), *order, CatchUp(), _ControllerDies()], confirm_timeout=1)
    with pytest.raises(SystemExit):
        m.run()
    with a.node() as src, b.node() as tgt:  # right after: frozen source, copy on the target, both pending
        assert src.admission() is False and tgt.statistics()["lb-binding:binding"][0] == 40
        time.sleep(1.6)
        assert src.admission() is True and src.statistics() == before
        assert tgt.statistics()["lb-binding:binding"] == (0, "0000000000000000")


def test_a_controller_dead_between_the_copy_and_the_freeze_leaves_both_serving_and_the_copy_rolled_back(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(40))
    before = a.node().statistics()
    m = migration(a, b, [Preflight(), Copy(WholeLists()), _ControllerDies(), Freeze()], confirm_timeout=1)
    with pytest.raises(SystemExit):
        m.run()
    with a.node() as src, b.node() as tgt:
        # The copy was committed while the source served (not left for the catch-up under the freeze) ...
        assert tgt.statistics()["lb-binding:binding"] == before["lb-binding:binding"]
        assert src.admission() is True and tgt.admission() is True
        time.sleep(1.6)
        # ... and, its controller gone, rolled back by the target itself; the source never stopped serving.
        assert tgt.statistics()["lb-binding:binding"] == (0, "0000000000000000")
        assert src.admission() is True and src.statistics() == before and tgt.admission() is True


class _Fails(Phase):
    name = "fault"

    def run(self, ctx: Context) -> str:
        raise ControllerError("a later phase fails")


def test_a_failure_after_the_committed_copy_cancels_it_at_once_and_the_catch_up_commits_only_the_last_changes(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(40))
    r = migration(a, b, [Preflight(), Copy(WholeLists()), Freeze(), CatchUp(), _Fails()], confirm_timeout=60).run()
    assert not r.ok and r.failed_phase == "fault"
    copy, catch = (next(p for p in r.phases if p.name == n) for n in ("copy", "catch-up"))
    assert "committed in" in copy.detail, copy.detail
    assert "nothing left to commit" in catch.detail, catch.detail  # no change since the read: no commit under the freeze
    assert any("copy" in u and "cancelled" in u for u in r.undone), r.undone
    # Cancelled, not waiting for the 60 s timeout: the target is as before, the source open again.
    assert r.readback["lb2"].tables["lb-binding:binding"] == (0, "0000000000000000")
    assert r.readback["lb1"].tables["lb-binding:binding"][0] == 40 and r.readback["lb1"].admission is True


@pytest.mark.parametrize("strategy", [WholeLists, ForwardedLists])
def test_changes_after_the_copys_commit_go_straight_into_running_and_an_undo_removes_them(pair: tuple[Served, Served], strategy: type) -> None:
    """A candidate taken after a commit is the agent's whole table: the catch-up writes into running (:writable-running)
    instead, outside the copy's confirmed series, so an undo must remove what it created there."""
    a, b = pair
    a.load(*entries(40))
    r = migration(a, b, [Preflight(), Copy(strategy()), Freeze(), _Traffic(a), CatchUp(), _Fails()], confirm_timeout=60).run()
    assert not r.ok and r.failed_phase == "fault"
    catch = next(p for p in r.phases if p.name == "catch-up")
    assert "4 changes from events" in catch.detail and "written into lb2's running (no commit)" in catch.detail, catch.detail
    assert any("copy" in u and "cancelled" in u for u in r.undone), r.undone
    # The copy's series cancelled and the entry the catch-up created in running removed: the target holds nothing.
    assert r.readback["lb2"].tables["lb-binding:binding"] == (0, "0000000000000000")
    assert r.readback["lb1"].tables["lb-binding:binding"][0] == 38 and r.readback["lb1"].admission is True


class _SlowCopy(WholeLists):
    """A copy slower than the confirm timeout (a loaded machine, a big table)."""

    def copy(self, ctx: Context) -> dict:
        time.sleep(0.7)
        ctx.renew()
        time.sleep(0.7)
        return super().copy(ctx)


def test_a_migration_longer_than_the_confirm_timeout_keeps_its_freeze_armed(pair: tuple[Served, Served]) -> None:
    """The timeout bounds how long an agent waits for a dead controller, not how long a live migration may take."""
    a, b = pair
    a.load(*entries(40))
    before = a.node().statistics()
    m = migration(a, b, [Preflight(), Freeze(), Copy(_SlowCopy()), CatchUp(), Verify(), _Sleep(0.6), _Sleep(0.6), NoSwitch(), Finish()], confirm_timeout=1)
    r = m.run()
    assert r.ok, r.text()  # without renewal the source's freeze rolls back after 1 s and finish is refused
    assert r.readback["lb2"].tables == before and r.readback["lb1"].admission is True


class _Sleep(Phase):
    name = "sleep"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, ctx: Context) -> str:
        time.sleep(self.seconds)
        return ""


def test_phases_declare_what_they_need_and_a_missing_capability_stops_before_any_change(pair: tuple[Served, Served]) -> None:
    a, b = pair

    class NeedsXpath(Phase):
        name = "xpath"
        needs = frozenset({"urn:ietf:params:netconf:capability:xpath:1.0"})

        def run(self, ctx: Context) -> str:
            raise AssertionError("must not run")

    r = migration(a, b, [*default_phases(), NeedsXpath()]).run()
    assert not r.ok and r.failed_phase == "connect" and "does not announce xpath" in r.error


@pytest.mark.parametrize("kind", ["state", "nat"])
def test_the_yang_library_each_agent_publishes_is_valid_for_libyang(tmp_path: Path, kind: str) -> None:
    import subprocess

    from natmig.agent.monitoring import Catalog
    from natmig.agent.server import OPTIONAL_CAPABILITIES
    from natmig.statemodel import common_module

    catalog = (Catalog.for_module(load_module(LB), common_module(), OPTIONAL_CAPABILITIES) if kind == "state"
               else Catalog.for_schema(default_codec().schema, OPTIONAL_CAPABILITIES))
    doc = tmp_path / "yl.xml"
    doc.write_bytes(catalog.yang_library())
    ietf = Path(__import__("sys").prefix) / "share" / "yang" / "modules" / "ietf"
    cp = subprocess.run(["yanglint", "-p", str(ietf), "-t", "get", str(ietf / "ietf-yang-library.yang"), str(ietf / "ietf-datastores.yang"), str(doc)],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    names = {e.identifier for e in catalog.implemented}
    assert {"ietf-yang-library", "ietf-netconf-monitoring"} <= names
    assert "natmig-state" in names  # the NAT agent implements it too
    assert any(c.startswith("urn:ietf:params:netconf:capability:yang-library:1.1?revision=2019-01-04&content-id=") for c in catalog.capabilities)


def test_the_engine_moves_nat_session_between_nat_agents_knowing_only_what_they_announce(tmp_path: Path) -> None:
    from natmig.model import NatSession, table_digest

    a, b = Served(tmp_path / "nat1", "nat1", module=None), Served(tmp_path / "nat2", "nat2", module=None)
    try:
        sessions = [NatSession("TCP", "10.0.0.2", 1000 + i, "198.51.100.1", 80, "203.0.113.1", 20000 + i, "ESTABLISHED", 300) for i in range(200)]
        sessions += [NatSession("UDP", "10.0.0.3", 2000 + i, "198.51.100.2", 53, "203.0.113.1", 30000 + i, None, 30) for i in range(50)]
        with a.client() as c:
            c.edit_sessions(sessions, target="running")
        r = migration(a, b).run()
        assert r.ok, r.text()
        assert r.modules == ["nat-session@2026-12-03"] and r.copied == {"nat-session:nat-session": 250}
        assert r.readback["nat2"].tables == {"nat-session:nat-session": (250, table_digest(sessions))}
        assert r.readback["nat1"].tables == {"nat-session:nat-session": (0, "0000000000000000")} and r.readback["nat1"].admission is True
        with b.client() as c:  # through the NAT's own module, as the NAT controller reads it
            assert sorted(c.get_sessions(), key=lambda s: s.key) == sorted(sessions, key=lambda s: s.key)
            assert c.get_admission() is True
    finally:
        a.stop()
        b.stop()


class _Traffic(Phase):
    """What a live function does to its table while frozen: entries end, and (a function's own state) new ones appear."""

    name = "traffic"

    def __init__(self, served: Served) -> None:
        self.served = served

    def run(self, ctx: Context) -> str:
        from natmig.agent.stateprovider import Change

        store = self.served.agent.store  # type: ignore[attr-defined]
        lst = store.module.list("binding")
        tables = store.provider.read()
        gone = sorted(tables[lst])[:3]
        born = Wire.complete(lst, {"client-address": "192.0.2.250", "client-port": 9, "backend-address": "198.51.100.10", "backend-port": 80, "snat-port": 9})
        store.provider.apply({lst: Change([born], gone)})
        return "3 ended, 1 born"


@pytest.mark.parametrize("events", [True, False], ids=["from-events", "re-read"])
def test_changes_of_the_frozen_source_after_the_read_reach_the_target(pair: tuple[Served, Served], events: bool) -> None:
    a, b = pair
    a.load(*entries(30))
    if not events:  # an agent that sends no state-change: the digests show the difference, the lists are read again
        a.agent.store.on_change = lambda *args: None  # type: ignore[attr-defined]
    phases = [Preflight(), Freeze(), Copy(WholeLists()), _Traffic(a), CatchUp(), Verify(), NoSwitch(), Finish()]
    r = migration(a, b, phases).run()
    assert r.ok, r.text()
    catch = next(p for p in r.phases if p.name == "catch-up")
    assert ("4 changes from events" in catch.detail) is events and ("4 from a re-read" in catch.detail) is (not events)
    tgt = r.readback["lb2"].tables["lb-binding:binding"]
    assert tgt[0] == 28  # 30 - 3 + 1
    with b.node() as n:
        n.discover()
        keys = {n.lists[1].key_of(e) for e in n.read(n.lists[1])}
    assert ("192.0.2.250", 9) in keys and len(keys) == 28


@pytest.mark.parametrize("events", [True, False], ids=["from-events", "reconciled"])
def test_a_forwarded_list_gets_the_frozen_sources_changes_and_the_retire_removes_what_moved(pair: tuple[Served, Served], events: bool) -> None:
    a, b = pair
    a.load(*entries(30))
    if not events:  # no state-change: the digests differ in verify, and the list is reconciled there
        a.agent.store.on_change = lambda *args: None  # type: ignore[attr-defined]
    phases = [Preflight(), Freeze(), Copy(ForwardedLists(first=4, most=8)), _Traffic(a), CatchUp(), Verify(), NoSwitch(), Finish()]
    r = migration(a, b, phases).run()
    assert r.ok, r.text()
    copy = next(p for p in r.phases if p.name == "copy")
    assert "lb-binding:binding 30 (forwarded)" in copy.detail, copy.detail
    catch = next(p for p in r.phases if p.name == "catch-up")
    verify = next(p for p in r.phases if p.name == "verify")
    assert ("4 changes from events" in catch.detail) is events
    assert ("lb-binding:binding: 4 entries the events did not bring written" in verify.detail) is (not events), verify.detail
    assert r.readback["lb2"].tables["lb-binding:binding"][0] == 28  # 30 - 3 + 1
    with b.node() as n:
        n.discover()
        keys = {n.lists[1].key_of(e) for e in n.read(n.lists[1])}
    assert ("192.0.2.250", 9) in keys and len(keys) == 28
    # retire delete: the forwarded entries by their keys as sent, and the one born after the read
    assert r.readback["lb1"].tables["lb-binding:binding"][0] == 0


def test_a_list_whose_text_is_not_plain_is_copied_decoded_instead(pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    from natmig.wire.slices import ListText

    a, b = pair
    a.load(*entries(50))
    sent: list[int] = []
    plain = ListText.add

    def refuse_the_third(self: ListText, part: str) -> bool:
        sent.append(part.count("</binding>"))
        return len(sent) < 3 and plain(self, part)

    monkeypatch.setattr(ListText, "add", refuse_the_third)
    r = migration(a, b, [Preflight(), Copy(ForwardedLists(first=5, most=5)), Freeze(), CatchUp(), Verify(), NoSwitch(), Finish()]).run()
    assert r.ok, r.text()
    copy = next(p for p in r.phases if p.name == "copy")
    assert "lb-binding:binding 50;" in copy.detail, copy.detail  # not "(forwarded)"
    assert len(sent) == 3  # two slices forwarded, the third refused: nothing more sent, then the list decoded
    assert r.readback["lb2"].tables["lb-binding:binding"][0] == 50 and r.readback["lb1"].tables["lb-binding:binding"][0] == 0


class _ChangesWhileCopying(WholeLists):
    """The copy, with the source's own traffic between the read of its binding list and the write of it.

    It reads the source's admission back from its agent first (on a session
    of its own), then deletes 3 entries, creates 2 and changes 2 (a leaf the
    digest covers, and one it does not): 9 state-change events, a changed
    entry being deleted then created.
    """

    def __init__(self, served: Served) -> None:
        self.served = served
        self.admits: list[bool] = []

    def copy(self, ctx: Context) -> dict:
        out = {}
        for lst in ctx.lists:
            got = ctx.source.read(lst)
            if lst.name == "binding":
                with self.served.node() as n:
                    self.admits.append(n.admission())
                self.traffic()
            ctx.target.write(lst, got)
            out[lst] = got
        return out

    def traffic(self) -> None:
        from natmig.agent.stateprovider import Change

        store = self.served.agent.store  # type: ignore[attr-defined]
        lst = store.module.list("binding")
        table = store.provider.read()[lst]
        keys = sorted(table)
        names = [leaf.name for leaf in lst.leaves]

        def changed(key: tuple, **leaves: object) -> tuple:
            return Wire.complete(lst, {**{n: v for n, v in zip(names, table[key]) if v is not None}, **leaves})

        born = [Wire.complete(lst, {"client-address": "192.0.2.250", "client-port": p, "backend-address": "198.51.100.10",
                                    "backend-port": 80, "snat-port": p}) for p in (9, 10)]
        store.provider.apply({lst: Change([*born, changed(keys[3], **{"snat-port": 9999}), changed(keys[4], **{"idle-timeout": 7})], keys[:3])})


def _served_copy(strategy: WholeLists, phases: list[Phase]) -> list[Phase]:
    return [Copy(strategy) if isinstance(p, Copy) else p for p in phases]


def _same_lists(a: Served, b: Served) -> None:
    """Every entry of every list, every leaf, the same on both agents."""
    with a.node() as na, b.node() as nb:
        na.discover()
        nb.discover()
        for la, lb in zip(na.lists, nb.lists):
            assert sorted(na.read(la)) == sorted(nb.read(lb)), la.qname


def _count(detail: str, what: str) -> int:
    import re

    m = re.search(rf"(\d+) {what}", detail)
    return int(m.group(1)) if m else 0


def test_entries_created_deleted_and_changed_while_the_serving_source_is_copied_end_up_on_the_target(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(40))
    strategy = _ChangesWhileCopying(a)
    r = migration(a, b, _served_copy(strategy, default_phases()), retire="keep").run()
    assert r.ok, r.text()
    assert strategy.admits == [True]  # read back from the source's agent during the copy: it still admitted new entries
    assert [p.name for p in r.phases] == ["preflight", "copy", "freeze", "catch-up", "verify", "switch", "finish"]
    copy, catch = (next(p for p in r.phases if p.name == n) for n in ("copy", "catch-up"))
    assert "while lb1 serves" in copy.detail and "lb-binding:binding 40" in copy.detail
    # 3 deleted, 2 created, 2 changed (each deleted then created): written from events, before or after the freeze
    assert _count(copy.detail, "changes since the read") + _count(catch.detail, "changes from events") == 9, (copy.detail, catch.detail)
    assert "0 from a re-read" in catch.detail
    assert r.readback["lb2"].tables["lb-binding:binding"][0] == 39 and r.readback["lb2"].tables == r.readback["lb1"].tables
    _same_lists(a, b)  # exactly: the changed idle-timeout too, which no digest covers


class _Unannounced(StateNode):
    """A session to an agent whose hello, as this controller reads it, announces no notifications."""

    @property
    def capabilities(self) -> list[str]:
        return [c for c in self.client.capabilities if c != NOTIFICATION_CAPABILITY]


def test_a_source_that_announces_no_notifications_is_frozen_before_the_copy(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(40))
    strategy = _ChangesWhileCopying(a)
    m = EngineMigration(lambda: _Unannounced(a.client()), b.node, a.name, b.name, EngineOptions(retire="keep"),
                        _served_copy(strategy, default_phases()))
    r = m.run()
    assert r.ok, r.text()
    assert strategy.admits == [False]  # its changes could not be followed while it served: frozen first
    assert [p.name for p in r.phases] == ["preflight", "freeze", "copy", "catch-up", "verify", "switch", "finish"]
    copy, catch = (next(p for p in r.phases if p.name == n) for n in ("copy", "catch-up"))
    assert "lb1 frozen" in copy.detail
    assert "0 changes from events, 7 from a re-read" in catch.detail  # 2 created, 2 changed, 3 deleted
    _same_lists(a, b)


def test_the_engine_follows_the_nat_agents_state_change_while_it_serves(tmp_path: Path) -> None:
    """The NAT agent sends natmig-state's state-change beside its own event: the engine needs nothing of the NAT's."""
    from dataclasses import replace

    from natmig.model import NatSession

    a, b = Served(tmp_path / "nat1", "nat1", module=None), Served(tmp_path / "nat2", "nat2", module=None)
    try:
        sessions = [NatSession("TCP", "10.0.0.2", 1000 + i, "198.51.100.1", 80, "203.0.113.1", 20000 + i, "ESTABLISHED", 300) for i in range(100)]
        with a.client() as c:
            c.edit_sessions(sessions, target="running")
        provider = a.agent.provider

        class During(WholeLists):
            def copy(self, ctx: Context) -> dict:
                out = {}
                for lst in ctx.lists:
                    got = ctx.source.read(lst)
                    provider.delete([s.key for s in sessions[:2]])
                    provider.apply([NatSession("UDP", "10.0.0.3", 53000, "198.51.100.2", 53, "203.0.113.1", 30000, None, 30),
                                    replace(sessions[2], translated_port=31000), replace(sessions[3], timeout=77)])
                    ctx.target.write(lst, got)
                    out[lst] = got
                return out

        r = migration(a, b, _served_copy(During(), default_phases()), retire="keep").run()
        assert r.ok, r.text()
        copy, catch = (next(p for p in r.phases if p.name == n) for n in ("copy", "catch-up"))
        assert "while nat1 serves" in copy.detail
        # 2 deleted, 1 created, 2 changed (each: destroyed, then new)
        assert _count(copy.detail, "changes since the read") + _count(catch.detail, "changes from events") == 7, (copy.detail, catch.detail)
        with a.client() as ca, b.client() as cb:
            want = sorted(ca.get_sessions(), key=lambda s: s.key)
            assert len(want) == 99 and sorted(cb.get_sessions(), key=lambda s: s.key) == want
    finally:
        a.stop()
        b.stop()


def test_events_followed_on_a_session_of_their_own_which_is_closed_once_caught_up(pair: tuple[Served, Served]) -> None:
    # A session subscribed stays subscribed: on the migration's own, the retire's deletions
    # would all stream back to the controller ahead of the unlock's reply.
    a, b = pair
    a.load(*entries(30))
    opened: list[StateNode] = []

    def events() -> StateNode:
        opened.append(a.node())
        return opened[-1]

    class Closed(Phase):
        name = "closed"

        def run(self, ctx: Context) -> str:
            assert ctx.events is None and len(opened) == 1 and not opened[0].connected and ctx.source.connected
            return "the event session is closed"

    phases = [Preflight(), Freeze(), Copy(WholeLists()), _Traffic(a), CatchUp(), Closed(), Verify(), NoSwitch(), Finish()]
    r = EngineMigration(a.node, b.node, a.name, b.name, EngineOptions(), phases, source_events=events).run()  # type: ignore[arg-type]
    assert r.ok, r.text()
    assert "4 changes from events" in next(p for p in r.phases if p.name == "catch-up").detail
    assert r.readback["lb2"].tables["lb-binding:binding"][0] == 28


def test_a_kept_session_migrated_from_again_drops_what_queued_since_and_the_registry_keeps_it_empty(pair: tuple[Served, Served]) -> None:
    # A controller service keeps one session per agent: the first migration leaves it subscribed.
    from natmig.controller.registry import AgentEntry, Registry

    a, b = pair
    a.load(*entries(20))
    na, nb = a.node(), b.node()
    try:
        keep = {"close_nodes": False}
        r = EngineMigration(lambda: na, lambda: nb, "lb1", "lb2", EngineOptions(retire="delete"), **keep).run()  # type: ignore[arg-type]
        assert r.ok, r.text()
        r = EngineMigration(lambda: nb, lambda: na, "lb2", "lb1", EngineOptions(retire="delete"), **keep).run()  # type: ignore[arg-type]
        assert r.ok, r.text()
        # lb1's session has been subscribed since the first move; 30 changes queue on it while idle.
        a.load(*entries(30, base=100))
        deadline = time.monotonic() + 5
        while na.client._mgr._session._notification_q.qsize() < 30 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
        reg = Registry(keepalive=3600)
        try:
            entry = AgentEntry("lb1", "", True, 0, 0, [], node=na)
            reg._check(entry)  # what its keepalive does to an idle agent
        finally:
            reg._stop.set()
        assert na.changes() == []  # dropped, not piled up for the next migration
        r = EngineMigration(lambda: na, lambda: nb, "lb1", "lb2", EngineOptions(retire="delete"), **keep).run()  # type: ignore[arg-type]
        assert r.ok, r.text()
        assert "0 changes from events" in next(p for p in r.phases if p.name == "catch-up").detail
        assert r.readback["lb2"].tables["lb-binding:binding"][0] == 50
    finally:
        na.close()
        nb.close()


class FakeSteering:
    """A switch in memory: which node traffic goes through, and whether it obeys."""

    def __init__(self, active: str, broken: bool = False) -> None:
        self.now, self.broken, self.moves = active, broken, []

    def point_to(self, nat: str) -> None:
        self.moves.append(nat)
        if not self.broken:
            self.now = nat

    def active(self) -> str | None:
        return self.now


def test_with_a_switch_traffic_moves_after_the_copy_and_is_read_back(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(20))
    sw = FakeSteering("lb1")
    r = migration(a, b, default_phases(sw)).run()
    assert r.ok, r.text()
    assert [p.name for p in r.phases] == ["preflight", "traffic", "copy", "freeze", "catch-up", "verify", "hold", "switch", "finish"]
    assert sw.moves == ["lb2"] and r.traffic_on == "lb2" and "traffic on: lb2 (read back from the switch)" in r.text()


def test_a_switch_that_does_not_obey_is_undone_and_the_state_stays_on_the_source(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(20))
    before = a.node().statistics()
    sw = FakeSteering("lb1", broken=True)
    r = migration(a, b, default_phases(sw)).run()
    assert not r.ok and r.failed_phase == "switch" and "reads lb1" in r.error
    assert sw.moves == ["lb2", "lb1"]  # told to move, then pointed back
    assert r.traffic_on == "lb1"
    assert r.readback["lb1"].tables == before and r.readback["lb1"].admission is True
    assert r.readback["lb2"].tables["lb-binding:binding"][0] == 0  # the target's copy cancelled


class WatchingSteering(FakeSteering):
    """Reads the target's admission (on a session of its own) whenever the switch is told to move."""

    def __init__(self, active: str, target: Served, broken: bool = False) -> None:
        super().__init__(active, broken)
        self.target = target
        self.target_admits: list[bool] = []

    def point_to(self, nat: str) -> None:
        with self.target.node() as n:
            self.target_admits.append(n.admission())
        super().point_to(nat)


def test_with_a_switch_the_target_holds_new_entries_from_before_the_switch_until_finish(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(20))
    sw = WatchingSteering("lb1", b)
    r = migration(a, b, default_phases(sw)).run()
    assert r.ok, r.text()
    assert sw.target_admits == [False]  # closed when traffic reached it
    assert "copy confirmed and admission reopened" in next(p for p in r.phases if p.name == "finish").detail
    assert r.readback["lb2"].admission is True and r.readback["lb1"].admission is True
    # Agents that keep their state in memory carry no traffic: they report no state-control/held.
    assert r.readback["lb2"].held is None and "holds" not in r.readback["lb2"].line()


def test_an_undone_switch_reopens_the_held_target_only_after_traffic_is_back_on_the_source(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(20))
    sw = WatchingSteering("lb1", b, broken=True)
    r = migration(a, b, default_phases(sw)).run()
    assert not r.ok and r.failed_phase == "switch"
    assert sw.moves == ["lb2", "lb1"] and sw.target_admits == [False, False]  # still holding when pointed back
    assert any("hold cancelled" in u and "copy removed" in u for u in r.undone), r.undone
    assert r.readback["lb2"].admission is True and r.readback["lb2"].tables["lb-binding:binding"][0] == 0
    assert r.readback["lb1"].admission is True and r.traffic_on == "lb1"


@pytest.mark.parametrize("dies", ["after-hold", "after-switch"])
def test_a_controller_dead_once_the_target_held_never_takes_its_copy_away(pair: tuple[Served, Served], dies: str) -> None:
    """From the switch on the target may carry traffic: a controller dying then must not leave its copy rolling back."""
    a, b = pair
    a.load(*entries(40))
    before = a.node().statistics()
    sw = FakeSteering("lb1")
    phases = default_phases(sw)
    at = next(i for i, p in enumerate(phases) if p.name == dies.split("-")[1]) + 1
    m = migration(a, b, [*phases[:at], _ControllerDies(), *phases[at:]], confirm_timeout=1)
    with pytest.raises(SystemExit):
        m.run()
    assert sw.active() == ("lb2" if dies == "after-switch" else "lb1")
    with a.node() as src, b.node() as tgt:
        assert src.admission() is False and tgt.admission() is False  # both hold, each a confirmed commit of its own
        time.sleep(1.6)
        # Both reopened by themselves; the target keeps the copy, the source its entries (`natmig recover` removes
        # them from whichever node carries no traffic).
        assert src.admission() is True and tgt.admission() is True
        assert tgt.statistics()["lb-binding:binding"] == before["lb-binding:binding"] == src.statistics()["lb-binding:binding"]


def test_traffic_not_on_the_source_refuses_before_anything_changes(pair: tuple[Served, Served]) -> None:
    a, b = pair
    sw = FakeSteering("lb2")
    r = migration(a, b, default_phases(sw), recover_hint="natmig recover ...").run()
    assert not r.ok and r.failed_phase == "traffic" and "not through the source lb1" in r.error and sw.moves == []
    assert r.readback["lb1"].admission is True


def test_the_outcome_says_whether_anything_is_left_changed(pair: tuple[Served, Served]) -> None:
    a, b = pair
    a.load(*entries(10))
    b.load(binding("203.0.113.9", 5555, snat=1024))  # lb1's first binding uses snat-port 1024 to the same backend
    r = migration(a, b).run()
    assert not r.ok and r.outcome == "unchanged", r.text()  # refused in copy, undone, both read back
    r = migration(a, b, [Preflight(), Freeze(), _StopTarget(b), Copy(WholeLists()), CatchUp(), Verify(), NoSwitch()]).run()
    assert not r.ok and r.outcome == "attention"  # the target could not be read back: nobody knows what it holds
