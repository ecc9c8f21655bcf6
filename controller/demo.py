"""`natmig demo`: the four steps of the original demo, on the embedded testbed, with live traffic.

1. initial deployment: client, nat1, server, nat1's agent; live flows start;
2. another NAT: nat2 and its agent, idle (empty table);
3. migrating state: preflight, copy, catch-up (nat1 -> nat2);
4. upgrading the graph: switch to nat2, verify, nat1 retired.

The traffic (N TCP connections and N UDP flows from the client, plus
optional new connections every second) runs from before step 1 ends until
after step 4, and the report says how many flows survived with the same
public port and the largest gap any saw.  Everything the demo makes (the
testbed, the agents, the traffic programs, a work directory) is removed at
the end, also on failure or Ctrl-C.  The agents are an
:class:`~natmig.controller.agentfleet.AgentFleet`, the table moved
:mod:`.demosessions`' made-up sessions.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from .. import netns
from ..errors import NatmigError, UsageError
from ..model import NatSession
from .agentfleet import AgentFleet
from .demorun import control_plane_priority, phase_line, raise_interrupt, tear_down
from .demosessions import load_sessions, synthetic_sessions
from .migrate import Endpoint, MigrateOptions, Migration
from .report import MigrationReport, PhaseTiming, format_report, ms
from .steering import TestbedSteering
from .traffic import LiveTraffic, TrafficSpec
from .trafficresult import TrafficResult


@dataclass
class DemoOptions:
    """What `natmig demo` runs."""

    sessions: int = 1000
    tcp: int = 50
    udp: int = 50
    interval: float = 0.01
    churn: float = 0.0
    no_state: bool = False
    json_path: str | None = None
    plot_path: str | None = None
    prefix: str | None = None
    topology: str | None = None
    before: float = 1.0
    after: float = 1.5
    retire: str = "delete"
    provider: str = "conntrack"
    #: the network function: "nat" (this module's demo) or "firewall" (:mod:`.fwdemo`).
    nf: str = "nat"


@dataclass
class DemoResult:
    """The migration report, the traffic result, and the verdict."""

    migration: MigrationReport | None
    traffic: TrafficResult | None
    steps: dict[str, float]
    ok: bool
    error: str | None = None
    #: the move as a controller service's northbound reported it (--via-controller), instead of ``migration``.
    remote: Any = None

    def phases(self) -> list[PhaseTiming]:
        """The move's phases, from the migration's report or the northbound's notifications."""
        if self.migration is not None:
            return self.migration.phases
        return list(self.remote.phases) if self.remote is not None else []

    def switch_gap(self) -> tuple[float, bool]:
        """The largest live-flow gap overlapping the switch phase (seconds), and whether it is exact."""
        if self.traffic is None:
            return 0.0, True
        for p in self.phases():
            if p.name == "switch" and p.started:
                return self.traffic.largest_gap_during(p.started, p.started + p.seconds)
        return 0.0, True

    def switch_gap_text(self) -> str:
        """The switch gap for people ("4.4 ms", or "< 12.0 ms" when only bounded)."""
        gap, exact = self.switch_gap()
        return f"{'' if exact else '< '}{gap * 1000:.1f} ms"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        gap, exact = self.switch_gap()
        return {
            "ok": self.ok,
            "switch_gap_ms": round(gap * 1000, 2),
            "switch_gap_exact": exact,
            "error": self.error,
            "steps_seconds": self.steps,
            "migration": self.migration.to_dict() if self.migration else None,
            "via_controller": self.remote.to_dict() if self.remote is not None else None,
            "traffic": self.traffic.summary() if self.traffic else None,
        }


class Demo:
    """Runs the four steps; :meth:`run` always tears down what it made."""

    def __init__(self, opts: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.opts = opts
        self.out = out
        self.steps: dict[str, float] = {}

    def say(self, text: str) -> None:
        """One line of progress."""
        print(text, file=self.out, flush=True)

    def run(self) -> DemoResult:
        """All four steps, the report, and the teardown."""
        from ..testbed.bed import Testbed

        o = self.opts
        prefix = o.prefix or netns.run_prefix("nd")
        tb = Testbed.from_file(o.topology, prefix)
        fleet: AgentFleet | None = None
        traffic: LiveTraffic | None = None
        report: MigrationReport | None = None
        result: TrafficResult | None = None
        remote: Any = None
        error = None
        if len(tb.topology.pairs()) > 1:
            raise UsageError(f"--topology {tb.topology.source}: {len(tb.topology.pairs())} NAT instances; the demo moves one "
                             "(natmig drain moves every instance of a machine, docs/multihost.md)")
        src = tb.topology.active_nat
        dst = tb.topology.twins(src)[0]
        # Made once the topology is known good: a refused one leaves nothing behind.
        work = Path(tempfile.mkdtemp(prefix="natmig-demo-"))
        old = signal.signal(signal.SIGTERM, raise_interrupt)
        try:
            t = time.perf_counter()
            self.say(f"[1/4] initial deployment: client, {src}, server, agent of {src} (testbed {prefix})")
            tb.up()
            netns.ensure_conntrack_capacity(2 * o.sessions + 65536)
            fleet = self.fleet(tb, work)
            fleet.start(src)
            spec = TrafficSpec(tcp=o.tcp, udp=o.udp, interval=o.interval, churn=o.churn)
            traffic = LiveTraffic(tb.netns("client"), tb.netns("server"), tb.address("server"), spec, str(work))
            traffic.start()
            self.say(f"      live traffic: {o.tcp} TCP connections + {o.udp} UDP flows, one message every {ms(o.interval)} each"
                     + (f", {o.churn:g} new connections/s" if o.churn else ""))
            if o.sessions:
                extra = synthetic_sessions(o.sessions, tb.topology.public_pool(src), servers=tb.topology.spare_addresses("public", 16))
                load_sessions(fleet.endpoint(src), extra)
            time.sleep(o.before)
            n_src = len(_read_table(fleet.endpoint(src)))
            self.say(f"      {src} holds {n_src} sessions ({o.sessions} loaded + live traffic)")
            self.steps["1 initial deployment"] = time.perf_counter() - t

            t = time.perf_counter()
            self.say(f"[2/4] another NAT: {dst} and its agent, idle")
            fleet.start(dst)
            n_dst = len(_read_table(fleet.endpoint(dst)))
            self.say(f"      {dst} holds {n_dst} sessions; traffic goes through {tb.active_nat()}")
            self.steps["2 another NAT"] = time.perf_counter() - t

            inv = fleet.write_inventory(src, dst)
            self.say(f"[3/4] migrating state {src} -> {dst}" + ("  (--no-state: NOT copying sessions)" if o.no_state else "")
                     + f"  [same as: {self.same_as(inv)}]")
            t3 = time.perf_counter()
            marks: dict[str, float] = {}

            def on_phase(ph: PhaseTiming) -> None:
                self.say(phase_line(ph))
                if ph.name in ("catch-up", "preflight") and (ph.name == "catch-up" or o.no_state) and ph.ok:
                    marks["3"] = time.perf_counter()
                    self.say(f"[4/4] upgrading the graph: traffic to {dst}, {src} retired")

            with control_plane_priority():
                moved = self.migrate(tb, fleet, src, dst, on_phase)
            if isinstance(moved, MigrationReport):
                report = moved
            else:
                remote = moved
            end = time.perf_counter()
            self.steps["3 migrating state"] = marks.get("3", end) - t3
            self.steps["4 upgrading the graph"] = end - marks.get("3", end)
            time.sleep(o.after)
            result = traffic.stop()
        except KeyboardInterrupt:
            error = "interrupted"
            self.say("interrupted: tearing down")
        except NatmigError as e:
            error = str(e)
            self.say(f"error: {e}")
        finally:
            signal.signal(signal.SIGTERM, old)
            self.say("teardown: traffic, agents, testbed")
            tear_down(self.say, [("traffic", traffic.close if traffic else None), ("agents", fleet.close if fleet else None),
                                 ("controller", self.teardown_extra), ("testbed", tb.down)])
            shutil.rmtree(work, ignore_errors=True)
        moved_ok = (report is not None and report.ok) or (remote is not None and remote.ok)
        ok = error is None and moved_ok and result is not None and result.all_survived
        failure = report.error if report and not report.ok else remote.error if remote and not remote.ok else None
        res = DemoResult(report, result, self.steps, ok, error or failure, remote)
        self.print_report(res)
        if o.json_path == "-":
            print(json.dumps(res.to_dict(), indent=2), flush=True)
        elif o.json_path:
            Path(o.json_path).write_text(json.dumps(res.to_dict(), indent=2))
        if o.plot_path and res.migration is not None and res.traffic is not None:
            from .plot import plot

            plot(res.to_dict(), o.plot_path)
            self.say(f"picture of the move: {o.plot_path}")
        return res

    def same_as(self, inventory: Path) -> str:
        """The command line that makes the same move (this demo runs the NAT's own migration; `natmig migrate`'s default
        is the generic engine)."""
        return f"natmig migrate --inventory {inventory} --set migration.engine=nat"

    def fleet(self, tb: Any, work: Path) -> AgentFleet:
        """The agents of the NAT nodes (not started yet)."""
        return AgentFleet(tb, work, provider=self.opts.provider)

    def migrate(self, tb: Any, fleet: AgentFleet, src: str, dst: str, on_phase: Callable[[PhaseTiming], None]) -> Any:
        """Step 3 and 4: the live migration (this process is the controller); returns its report."""
        o = self.opts
        return Migration(fleet.endpoint(src), fleet.endpoint(dst), TestbedSteering(tb),
                         MigrateOptions(copy_state=not o.no_state, retire=o.retire), on_phase).run()

    def teardown_extra(self) -> None:
        """What a variant of the demo started beside the agents (nothing here)."""

    def print_report(self, r: DemoResult) -> None:
        """The final report: sessions moved, phase times, largest gap, flows that survived."""
        self.say("")
        self.say("=" * 72)
        if r.migration is not None:
            self.say(format_report(r.migration))
        if r.remote is not None:
            self.say(f"the controller's northbound replied: ok {str(r.remote.ok).lower()}, outcome {r.remote.outcome}"
                     + (f", failed in {r.remote.failed_phase}: {r.remote.error}" if not r.remote.ok else ""))
            self.say(r.remote.report)
        for name, secs in r.steps.items():
            self.say(f"  step {name:<24} {ms(secs):>11}")
        if r.traffic is not None:
            s = r.traffic.summary()
            if r.migration is not None:
                self.say(f"  sessions moved: {r.migration.copied + r.migration.caught_up + r.migration.reconciled}"
                         f" (verified {r.migration.verified})")
            self.say(f"  largest gap seen by a live flow: {s['largest_gap_ms']:.1f} ms (send interval {ms(r.traffic.interval)})"
                     + (f"; across the switch: {r.switch_gap_text()}" if any(p.name == "switch" for p in r.phases()) else ""))
            self.say(f"  flows that survived with the same public port: {s['live_survived']}/{s['live_flows']}"
                     f"  (TCP {s['tcp']['survived']}/{s['tcp']['total']}, UDP {s['udp']['survived']}/{s['udp']['total']})")
            if s["new_connections"]:
                self.say(f"  new connections opened during the run that survived: {s['new_connections_survived']}/{s['new_connections']}")
            for b in s["broken"][:5]:
                self.say(f"    broken: {b['proto']} flow {b['fid']}: {b['why']}")
        if r.error:
            self.say(f"  error: {r.error}")
        self.say(f"RESULT: {'every flow survived' if r.ok else 'NOT every flow survived'}")


def _read_table(ep: Endpoint) -> list[NatSession]:
    node = ep.open()
    try:
        return node.get_sessions("running")
    finally:
        node.close()


def run(opts: DemoOptions) -> int:
    """Run the demo of ``opts.nf``; exit status 0 only when every flow survived (and, for the firewall, the block was carried)."""
    # With --json - standard output carries the JSON alone; progress and the report go to stderr.
    out = sys.stderr if opts.json_path == "-" else sys.stdout
    if opts.nf == "firewall":
        from .fwdemo import FirewallDemo

        return 0 if FirewallDemo(opts, out).run().ok else 1
    return 0 if Demo(opts, out).run().ok else 1
