"""The generic engine on a live switch: connections opened at any instant of the move survive it.

Real NAT agents over SSH, conntrack in namespaces, the testbed's Open
vSwitch; the migration is the generic engine's (:mod:`natmig.controller.engine`),
with no NAT code in its path.  A *probe* is one TCP connection from the
client, opened at a chosen point of the migration (a phase of the test's own
between two of the engine's), that must connect, echo, and echo again after
the migration ended, with the same public endpoint.  Beside them, live flows
and a steady churn of short connections run through the whole move.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

from natmig import netns
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.engine import Context, Copy, EngineMigration, EngineOptions, Phase, WholeLists, default_phases
from natmig.controller.statenode import StateNode
from natmig.controller.steering import SteeringError, TestbedSteering
from natmig.testbed.bed import Testbed

from .helpers_migrate import bed, table, traffic

pytestmark = pytest.mark.root

FLOWS = Path(__file__).with_name("flows_natnode.py")
SERVER_PORT = 5011
#: A connection held on a node is released when that node's admission opens: it connects at most this long after.
SLACK = 0.5
#: Finish opens the target, then the source: a connection held on either connects within this long after finish begins.
RELEASED = 1.0

# Waits for "go", connects (timed, CLOCK_MONOTONIC), echoes a line; waits for "again", echoes another.
_PROBE = r"""
import json, socket, sys, time
sport = int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport))
print("ready", flush=True)
sys.stdin.readline()
out = {"start": time.monotonic()}
try:
    s.settimeout(30)
    s.connect((sys.argv[1], int(sys.argv[2])))
    out["connected"] = time.monotonic()
    f = s.makefile()
    s.sendall(b"1\n")
    out["first"] = f.readline().split()
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    s.settimeout(5)
    s.sendall(b"2\n")
    out["second"] = f.readline().split()
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
"""


class Probe:
    """One TCP connection from the client, ready to be opened at a point of the migration."""

    def __init__(self, tb: Testbed, where: str, sport: int) -> None:
        self.where = where
        self.sport = sport
        self.p = subprocess.Popen(netns.ns_cmd([sys.executable, "-c", _PROBE, tb.address("server"), str(SERVER_PORT), str(sport)],
                                               tb.netns("client")),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"
        self.opened: float | None = None

    def _say(self, word: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(word + "\n")
        self.p.stdin.flush()

    def go(self) -> None:
        self.opened = time.monotonic()
        self._say("go")

    def again(self) -> dict[str, Any]:
        """Echo once more (after the migration) and the connection's record."""
        self._say("again")
        out, err = self.p.communicate(timeout=40)
        lines = out.strip().splitlines()
        return json.loads(lines[-1]) if lines else {"error": f"no output: {err}"}

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class OpenProbe(Phase):
    """A test's step between two of the engine's: open one probe connection, and go on at once."""

    def __init__(self, probe: Probe) -> None:
        self.name = f"probe {probe.where}"
        self.probe = probe

    def run(self, ctx: Context) -> str:
        self.probe.go()
        return f"connection from port {self.probe.sport} opened"


def with_probes(phases: list[Phase], probes: dict[str, Probe]) -> list[Phase]:
    """``phases`` with a probe opened after each phase named in ``probes`` ("after:NAME")."""
    out: list[Phase] = []
    for ph in phases:
        out.append(ph)
        if (p := probes.get(f"after:{ph.name}")) is not None:
            out.append(OpenProbe(p))
    return out


def node_of(fleet: Any, nat: str) -> StateNode:
    return StateNode(fleet.endpoint(nat).open())  # type: ignore[arg-type]


@contextmanager
def _serving(tb: Testbed, probes: Iterable[Probe]) -> Iterator[None]:
    """The echo server in the server's namespace while the block runs; then the probes and the server stopped, by pid."""
    p = subprocess.Popen(netns.ns_cmd([sys.executable, str(FLOWS), "tcp-server", str(SERVER_PORT)], tb.netns("server")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield
    finally:
        for probe in probes:
            probe.kill()
        p.kill()
        p.wait()


POINTS = ("after:copy", "after:freeze", "after:catch-up", "after:verify", "after:switch")


def test_connections_opened_at_every_part_of_a_generic_move_complete_and_keep_working(tmp_path: Path) -> None:
    with bed(tmp_path, "eg") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(2000, tb.public_address, (20000, 29999)))
        probes = {pt: Probe(tb, pt, 42000 + i) for i, pt in enumerate(POINTS)}
        with _serving(tb, probes.values()):
            steering = TestbedSteering(tb)
            phases = with_probes(default_phases(steering), probes)
            with traffic(tb, tmp_path, churn=40, churn_life=0.2) as t:
                time.sleep(1.0)
                ends: dict[str, float] = {}
                mig = EngineMigration(lambda: node_of(fleet, "nat1"), lambda: node_of(fleet, "nat2"), "nat1", "nat2",
                                      EngineOptions(), phases, on_phase=lambda ph: ends.setdefault(ph.name, time.monotonic()),
                                      source_events=lambda: node_of(fleet, "nat1"))
                report = mig.run()
                ended = time.monotonic()
                time.sleep(2.0)
                result = t.stop()
            records = {pt: p.again() for pt, p in probes.items()}
        print(report.text())
        assert report.ok, report.error
        assert tb.active_nat() == "nat2"
        assert report.readback["nat1"].held == 0 and report.readback["nat2"].held == 0  # everything released
        for pt, r in records.items():
            print(pt, {k: v for k, v in r.items()}, f"opened {ended - probes[pt].opened:.3f} s before the end" if probes[pt].opened else "")
        bad = {pt: r for pt, r in records.items() if r.get("error") or "second" not in r}
        assert not bad, bad
        for pt, r in records.items():
            assert r["first"][-1] == r["second"][-1], f"{pt}: public port changed {r['first']} -> {r['second']}"
            assert r["connected"] <= ended + SLACK, f"{pt}: connected {r['connected'] - ended:.2f} s after the migration ended"
        # Traffic on the target, its admission still closed: held there until finish opened it, not admitted at once
        # (a switch undone then would have broken it; see the fault test below).
        finish = ends["probe after:switch"]
        after_switch = records["after:switch"]
        assert after_switch["connected"] > finish, after_switch
        # Each one held (on the source or the target) was released when finish opened its node: connected right
        # then, not on a retransmission of its SYN (1 s and more after the attempt).
        late = {pt: round(r["connected"] - finish, 3) for pt, r in records.items() if r["connected"] - finish > RELEASED}
        assert not late, f"connected that long (s) after finish began: {late}"
        assert all(r["first"][-2] == tb.public_address for r in records.values())
        assert len(result.of("churn")) >= 40
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why} (sent {b.sent}, echoed {b.echoed}, largest gap {b.max_gap:.2f} s)" for b in result.broken()[:10]]
        assert result.live_survived == result.live_total == 10


class ProbeInCopy(WholeLists):
    """The copy, with a probe opened between the read of each list and its write: the source still serves then, and
    the probe's entry is in no read (only in the source's events)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def copy(self, ctx: Context) -> dict:
        out = {}
        for lst in ctx.lists:
            got = ctx.source.read(lst)
            if self.probe.opened is None:
                self.probe.go()
            ctx.target.write(lst, got)
            out[lst] = got
        return out


#: A connection not held connects in a round trip: well under this even while the copy keeps both cores busy (0.23 s
#: measured so, with the switch's and the agents' processes contended; 1 ms on a quiet machine).  Held, it would
#: connect only in finish, after the copy.
NOT_HELD = 0.5
#: The write of the copy after the probe opened: ~0.8 s at 30,000 on a quiet machine, too close to NOT_HELD.
LARGE = 50_000


def test_a_connection_opened_while_a_large_table_is_copied_connects_at_once_and_survives_the_move(tmp_path: Path) -> None:
    """The generic engine copies while the source serves: a new connection waits for nothing during the copy."""
    with bed(tmp_path, "ec") as (tb, fleet):
        t0 = time.monotonic()
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(LARGE, tb.public_address, (20000, 29999)))
        print(f"{LARGE} sessions loaded into nat1 in {time.monotonic() - t0:.1f} s")
        during = Probe(tb, "during:copy", 42300)
        probes = {pt: Probe(tb, pt, 42301 + i) for i, pt in enumerate(("after:copy", "after:freeze", "after:switch"))}
        with _serving(tb, [during, *probes.values()]):
            phases = with_probes([Copy(ProbeInCopy(during)) if isinstance(p, Copy) else p for p in default_phases(TestbedSteering(tb))], probes)
            with traffic(tb, tmp_path, churn=40, churn_life=0.2) as t:
                time.sleep(1.0)
                ends: dict[str, float] = {}
                mig = EngineMigration(lambda: node_of(fleet, "nat1"), lambda: node_of(fleet, "nat2"), "nat1", "nat2",
                                      EngineOptions(), phases, on_phase=lambda ph: ends.setdefault(ph.name, time.monotonic()),
                                      source_events=lambda: node_of(fleet, "nat1"))
                report = mig.run()
                ended = time.monotonic()
                time.sleep(2.0)
                result = t.stop()
            record = during.again()
            records = {pt: p.again() for pt, p in probes.items()}
        print(report.text())
        print("during:copy", record)
        for pt, r in records.items():
            print(pt, r)
        assert report.ok, report.error
        assert [p.name for p in report.phases if not p.name.startswith("probe")] == [
            "preflight", "traffic", "copy", "freeze", "catch-up", "verify", "hold", "switch", "finish"]
        assert tb.active_nat() == "nat2"
        timing = {p.name: p.seconds for p in report.phases}
        assert during.opened is not None
        rest_of_copy = ends["copy"] - during.opened
        connect = record["connected"] - record["start"]
        print(f"copy {timing['copy']:.3f} s (after the probe opened: {rest_of_copy:.3f} s), catch-up {timing['catch-up']:.3f} s; "
              f"the probe opened during the copy connected in {connect * 1000:.1f} ms")
        # The copy went on for longer than a connection may take after the probe opened, and took longer than the
        # catch-up: what a held connection would have waited for.  Whether it was held is read from when it connected.
        assert rest_of_copy > NOT_HELD and timing["copy"] > timing["catch-up"], (rest_of_copy, timing)
        assert not record.get("error") and "second" in record, record
        assert connect < NOT_HELD, f"the connection opened during the copy took {connect:.3f} s to connect (held?)"
        assert record["connected"] < ends["copy"], "connected only after the copy ended"  # held ones connect in finish
        # ... and it was caught up from the source's events: the same public endpoint after the move, through nat2.
        assert record["first"][-2:] == record["second"][-2:] and record["first"][-2] == tb.public_address, record
        assert report.readback["nat1"].held == 0 and report.readback["nat2"].held == 0
        # The others as in the test above: opened after the copy (the source still serves) it connects at once;
        # after the freeze or the switch it is held, and released when finish opens its node.
        bad = {pt: r for pt, r in records.items() if r.get("error") or "second" not in r}
        assert not bad, bad
        assert records["after:copy"]["connected"] - records["after:copy"]["start"] < NOT_HELD, records["after:copy"]
        finish = ends["probe after:switch"]
        for pt, r in records.items():
            assert r["first"][-1] == r["second"][-1], f"{pt}: public port changed {r['first']} -> {r['second']}"
            assert r["connected"] <= ended + SLACK, f"{pt}: connected {r['connected'] - ended:.2f} s after the migration ended"
            assert r["connected"] - finish <= RELEASED, f"{pt}: connected {r['connected'] - finish:.2f} s after finish began"
        assert records["after:switch"]["connected"] > finish
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why} (sent {b.sent}, echoed {b.echoed}, largest gap {b.max_gap:.2f} s)" for b in result.broken()[:10]]
        assert result.live_survived == result.live_total == 10


class FailingSwitch:
    """The testbed's switch; the move to ``target`` is applied, and then reported failed after ``linger`` s.

    What a fabric's later bundle refused looks like to the engine: traffic
    already reached the target when the switch phase fails.  ``on_moved``
    runs while traffic is on the target.
    """

    def __init__(self, tb: Testbed, target: str, on_moved: Any, linger: float = 0.5) -> None:
        self.inner = TestbedSteering(tb)
        self.target, self.on_moved, self.linger = target, on_moved, linger
        self.moves: list[str] = []

    def point_to(self, nat: str) -> None:
        self.inner.point_to(nat)
        self.moves.append(nat)
        if nat == self.target and self.moves.count(nat) == 1:
            self.on_moved()
            time.sleep(self.linger)
            raise SteeringError(f"the move to {nat} failed after its first bundle (injected by the test)")

    def active(self) -> str | None:
        return self.inner.active()


def _admits(fleet: Any, nat: str) -> bool:
    with node_of(fleet, nat) as n:
        return n.admission()


def _held(fleet: Any, nat: str) -> int | None:
    with node_of(fleet, nat) as n:
        return n.held()


def _wait_held(fleet: Any, nat: str, timeout: float = 3.0) -> int | None:
    """What ``nat``'s agent reports it holds, once it is at least 1 (or when ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    with node_of(fleet, nat) as n:
        while True:
            held = n.held()
            if (held or 0) >= 1 or time.monotonic() > deadline:
                return held
            time.sleep(0.02)


def test_a_switch_failing_after_the_target_held_leaves_nothing_held_and_the_held_connection_on_the_source(tmp_path: Path) -> None:
    with bed(tmp_path, "ef") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(500, tb.public_address, (20000, 29999)))
        probe = Probe(tb, "while traffic is on the target", 42100)
        with _serving(tb, [probe]):
            with traffic(tb, tmp_path) as t:
                time.sleep(0.5)
                before = table(fleet, "nat1")
                seen: dict[str, int | None] = {}

                def while_on_target() -> None:
                    probe.go()
                    seen["nat2"] = _wait_held(fleet, "nat2")  # read back from the target's agent: its SYN is held there

                sw = FailingSwitch(tb, "nat2", while_on_target, linger=0.1)
                mig = EngineMigration(lambda: node_of(fleet, "nat1"), lambda: node_of(fleet, "nat2"), "nat1", "nat2",
                                      EngineOptions(), default_phases(sw), source_events=lambda: node_of(fleet, "nat1"))
                report = mig.run()
                time.sleep(1.0)
                result = t.stop()
            record = probe.again()
        print(report.text())
        print(record)
        assert not report.ok and report.failed_phase == "switch", report.error
        assert sw.moves == ["nat2", "nat1"]
        assert (seen["nat2"] or 0) >= 1, seen
        # The connection attempted while traffic was on the target: held there, then made through the source
        # (admitted by the target instead, it was made there and reset once traffic was back on the source).
        assert not record.get("error") and "second" in record, record
        assert record["first"][-1] == record["second"][-1]
        assert (probe.opened or 0) < record["connected"]
        assert any("hold cancelled" in u and "copy removed" in u for u in report.undone), report.undone
        # Read back from the switch and from both agents.
        assert report.traffic_on == "nat1" and tb.active_nat() == "nat1"
        assert report.readback["nat1"].admission is True and report.readback["nat2"].admission is True
        assert report.readback["nat1"].held == 0 and report.readback["nat2"].held == 0
        assert _admits(fleet, "nat1") and _admits(fleet, "nat2") and _held(fleet, "nat1") == 0 and _held(fleet, "nat2") == 0
        after = table(fleet, "nat1")
        assert all(after.get(k) == v for k, v in before.items())  # nothing lost, nothing re-mapped
        assert report.readback["nat2"].tables["nat-session:nat-session"][0] == 0  # the copy cancelled
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why} (sent {b.sent}, echoed {b.echoed}, largest gap {b.max_gap:.2f} s)" for b in result.broken()[:10]]
        assert result.live_survived == result.live_total == 10


@pytest.mark.faults
def test_the_target_dying_after_it_started_holding_leaves_traffic_and_every_connection_on_the_source(tmp_path: Path) -> None:
    with bed(tmp_path, "ed") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(500, tb.public_address, (20000, 29999)))
        probe = Probe(tb, "after:switch", 42200)
        with _serving(tb, [probe]):
            with traffic(tb, tmp_path) as t:
                time.sleep(0.5)
                before = table(fleet, "nat1")

                def on_phase(ph: Any) -> None:
                    if ph.name == "hold":  # the target holds, traffic not yet on it: its agent dies now
                        fleet.stop("nat2", kill=True)

                phases = with_probes(default_phases(TestbedSteering(tb)), {"after:switch": probe})
                mig = EngineMigration(lambda: node_of(fleet, "nat1"), lambda: node_of(fleet, "nat2"), "nat1", "nat2",
                                      EngineOptions(confirm_timeout=3), phases, on_phase=on_phase,
                                      source_events=lambda: node_of(fleet, "nat1"))
                report = mig.run()
                time.sleep(1.0)
                result = t.stop()
            record = probe.again()
        print(report.text())
        print(record)
        assert not report.ok and report.failed_phase == "finish", report.error
        assert report.traffic_on == "nat1" and tb.active_nat() == "nat1"
        assert report.readback["nat1"].admission is True
        assert report.readback["nat2"].error  # dead: nobody can say; restarted, its agent undoes what was pending
        # Its copy was confirmed by the hold (no rollback may empty a target that may carry traffic): it needs recover.
        assert report.outcome == "attention"
        fleet.start("nat2")
        assert _admits(fleet, "nat2") and _admits(fleet, "nat1")  # the hold, a series of its own, rolled back at restart
        assert _held(fleet, "nat2") == 0 and _held(fleet, "nat1") == 0
        inv = fleet.write_inventory("nat1", "nat2")
        cp = subprocess.run([sys.executable, "-m", "natmig.cli", "recover", "--inventory", str(inv)], capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert table(fleet, "nat2") == {} or not set(before) & set(table(fleet, "nat2"))
        after = table(fleet, "nat1")
        assert all(after.get(k) == v for k, v in before.items())
        # Sent to a target that had died, the SYN was lost there; its retransmission went to the source.
        assert not record.get("error") and "second" in record, record
        assert record["first"][-1] == record["second"][-1]
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why} (sent {b.sent}, echoed {b.echoed}, largest gap {b.max_gap:.2f} s)" for b in result.broken()[:10]]
        assert result.live_survived == result.live_total == 10
