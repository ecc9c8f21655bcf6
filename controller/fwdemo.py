"""`natmig demo --nf firewall`: the four steps of the demo with two stateful firewalls.

The testbed is the firewall topology (``testbed/topologies/firewall.toml``):
fw1 and fw2 between an inside network (client, web) and the public side
(server, attacker), on the same private Open vSwitch as the NAT demo.

1. initial deployment: fw1 and its agent; live flows start, outbound
   (client -> server) and inbound to web's service (server -> web); the
   attacker floods web with new connections until fw1 blocks it;
2. another firewall: fw2 and its agent, idle;
3. migrating state: the generic engine (:mod:`.engine`) moves fw-state
   (sessions and blocked sources) fw1 -> fw2;
4. upgrading the graph: the engine's Open vSwitch phase points the switch at
   fw2 (read back from the switch), fw1 retired.

Afterwards every flow must have survived, and the attacker must still be
blocked with its remaining timeout carried: read back from fw2's agent, and
tried (a connection of the attacker's to web's service).  ``--no-state`` is
the negative control: the switch moves, nothing is copied; established TCP
flows are invalid on fw2 (``nf_conntrack_tcp_loose=0``) and die, and the
attacker is free.  The report states what was read back, nothing else.
The machinery (agents, traffic, teardown) is :mod:`.demo`'s.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import netns
from ..errors import ControllerError, NatmigError
from ..statemodel import Entry, StateList
from ..wire.state import Wire
from ..testbed.topology import DEFAULT_TOPOLOGY
from .agentfleet import AgentFleet
from .demo import DemoOptions
from .demorun import control_plane_priority, phase_line, sigterm_interrupts, tear_down
from .engine import EngineMigration, EngineOptions, default_phases, switch_only_phases
from .enginereport import EngineReport
from .report import PhaseTiming, ms
from .statenode import StateNode
from .steering import TestbedSteering
from .traffic import LiveTraffic, TrafficSpec
from .trafficresult import TrafficResult

#: The firewall demo's topology (beside the NAT demo's).
FIREWALL_TOPOLOGY = DEFAULT_TOPOLOGY.parent / "firewall.toml"
SESSIONS = "fw-state:session"
BLOCKED = "fw-state:blocked"
#: The flood goes to a port that is no service: a new connection counts on the meter whether or not it is admitted.
FLOOD_PORT = 5002
#: Datagrams the attacker sends, each from a new source port: more than any burst the topology allows.
FLOOD = 400
#: Seconds an agent may take to listen: agents run niced, and at load average 16 one took more than 30.
AGENT_START = 90.0
#: How long a connection attempt of the attacker may take before it counts as dropped.
PROBE_TIMEOUT = 1.0


@dataclass
class BlockRead:
    """A blocked source as an agent reported it: seconds left, and when (CLOCK_MONOTONIC) it was read."""

    node: str
    seconds: int | None
    at: float


@dataclass
class FirewallDemoResult:
    """The migration report, both directions' traffic, the attacker as read back and tried, and the verdict."""

    migration: EngineReport | None
    outbound: TrafficResult | None
    inbound: TrafficResult | None
    block_before: BlockRead | None
    block_after: BlockRead | None
    #: the attacker's connection to web's service: False when it was dropped (tried before and after the move).
    attacker_reached: dict[str, bool] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    ok: bool = False
    error: str | None = None
    block_timeout: int = 0

    @property
    def carried(self) -> bool:
        """The target's block counts down from the source's: no more left than on the source, no less than the time between the reads allows."""
        b, a = self.block_before, self.block_after
        if b is None or a is None or b.seconds is None or a.seconds is None:
            return False
        return b.seconds - (a.at - b.at) - 2 <= a.seconds <= b.seconds

    @property
    def flows_survived(self) -> bool:
        """Every live flow, both directions, survived."""
        return all(t is not None and t.all_survived for t in (self.outbound, self.inbound))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        def block(b: BlockRead | None) -> dict[str, Any] | None:
            return None if b is None else {"node": b.node, "seconds_left": b.seconds}

        return {
            "nf": "firewall", "ok": self.ok, "error": self.error, "steps_seconds": self.steps,
            "migration": json.loads(self.migration.to_json()) if self.migration else None,
            "traffic": {"outbound": self.outbound.summary() if self.outbound else None,
                        "inbound": self.inbound.summary() if self.inbound else None},
            "attacker": {"blocked_on_source": block(self.block_before), "blocked_on_target": block(self.block_after),
                         "timeout_carried": self.carried, "reached_service": self.attacker_reached,
                         "block_timeout": self.block_timeout},
        }


class FirewallDemo:
    """Runs the four steps on two firewalls; :meth:`run` always tears down what it made."""

    def __init__(self, opts: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.opts = opts
        self.out = out
        self.steps: dict[str, float] = {}

    def say(self, text: str) -> None:
        """One line of progress."""
        print(text, file=self.out, flush=True)

    def run(self) -> FirewallDemoResult:
        """All four steps, the report, and the teardown."""
        from ..testbed.bed import Testbed

        o = self.opts
        prefix = o.prefix or netns.run_prefix("nf")
        work = Path(tempfile.mkdtemp(prefix="natmig-fwdemo-"))
        tb = Testbed.from_file(o.topology or FIREWALL_TOPOLOGY, prefix)
        if tb.topology.function != "firewall" or tb.topology.firewall is None:
            raise ControllerError(f"--nf firewall: topology {tb.topology.source} has function = {tb.topology.function!r}, not \"firewall\"")
        for host in ("client", "web", "server", "attacker"):
            tb.netns(host)  # a topology without one of the demo's hosts is refused before anything is built
        policy = tb.topology.firewall
        fleet: AgentFleet | None = None
        outbound: LiveTraffic | None = None
        inbound: LiveTraffic | None = None
        res = FirewallDemoResult(None, None, None, None, None, block_timeout=policy.block_timeout)
        nodes = list(tb.topology.nats)
        src, dst = tb.topology.active_nat, next(n for n in nodes if n != tb.topology.active_nat)
        attacker, web = tb.address("attacker"), tb.address("web")
        web_port = next(p for proto, a, p in policy.services if proto == "tcp" and a == web)
        try:
            with sigterm_interrupts():
                t = time.perf_counter()
                self.say(f"[1/4] initial deployment: client, web, server, attacker, {src}, agent of {src} (testbed {prefix})")
                tb.up()
                netns.ensure_conntrack_capacity(2 * o.sessions + 65536)
                fleet = AgentFleet(tb, work, provider="firewall")
                fleet.start(src, AGENT_START)
                spec = TrafficSpec(tcp=o.tcp, udp=o.udp, interval=o.interval, port=web_port)
                (work / "out").mkdir()
                (work / "in").mkdir()
                outbound = LiveTraffic(tb.netns("client"), tb.netns("server"), tb.address("server"), spec, str(work / "out"))
                outbound.start()
                inbound = LiveTraffic(tb.netns("server"), tb.netns("web"), web, spec, str(work / "in"))
                inbound.start()
                self.say(f"      live traffic: {o.tcp} TCP + {o.udp} UDP flows client -> server, and as many server -> web:{web_port} "
                         f"(the inbound service), one message every {ms(o.interval)} each")
                if o.sessions:
                    self._load(fleet, src, synthetic_fw_sessions(o.sessions))
                flood(tb.netns("attacker"), attacker, web, FLOOD_PORT, FLOOD)
                res.block_before = self._await_block(fleet, src, attacker)
                res.attacker_reached["before"] = reaches(tb.netns("attacker"), attacker, web, web_port)
                stats = self._stats(fleet, src)
                self.say(f"      attacker {attacker} sent {FLOOD} new connections: {src}'s blocked set holds it with "
                         f"{res.block_before.seconds} s left of {policy.block_timeout} s (read back); its connection to web:{web_port} was "
                         f"{'ACCEPTED' if res.attacker_reached['before'] else 'dropped'}")
                self.say(f"      {src} holds {stats.get(SESSIONS, (0, ''))[0]} sessions ({o.sessions} loaded + live traffic) "
                         f"and {stats.get(BLOCKED, (0, ''))[0]} blocked source(s)")
                self.steps["1 initial deployment"] = time.perf_counter() - t

                t = time.perf_counter()
                self.say(f"[2/4] another firewall: {dst} and its agent, idle")
                fleet.start(dst, AGENT_START)
                stats = self._stats(fleet, dst)
                self.say(f"      {dst} holds {stats.get(SESSIONS, (0, ''))[0]} sessions, {stats.get(BLOCKED, (0, ''))[0]} blocked; "
                         f"traffic goes through {tb.active_nat()}")
                self.steps["2 another firewall"] = time.perf_counter() - t

                self.say(f"[3/4] migrating state {src} -> {dst}" + ("  (--no-state: NOT copying the state)" if o.no_state else "")
                         + " with the generic engine")
                t3 = time.perf_counter()
                marks: dict[str, float] = {}

                def on_phase(ph: PhaseTiming) -> None:
                    if ph.name == "switch" and "3" not in marks:
                        marks["3"] = ph.started
                        self.say(f"[4/4] upgrading the graph: traffic to {dst}, {src} retired")
                    self.say(phase_line(ph))

                steering = TestbedSteering(tb)
                mig = EngineMigration(lambda: StateNode(fleet.endpoint(src).open()), lambda: StateNode(fleet.endpoint(dst).open()),  # type: ignore[arg-type]
                                      src, dst, EngineOptions(retire=o.retire),
                                      switch_only_phases(steering) if o.no_state else default_phases(steering), on_phase,
                                      source_events=lambda: StateNode(fleet.endpoint(src).open()))  # type: ignore[arg-type]
                with control_plane_priority():
                    res.migration = mig.run()
                end = time.perf_counter()
                self.steps["3 migrating state"] = marks.get("3", end) - t3
                self.steps["4 upgrading the graph"] = end - marks.get("3", end)
                res.block_after = self._block(fleet, dst, attacker)
                res.attacker_reached["after"] = reaches(tb.netns("attacker"), attacker, web, web_port)
                time.sleep(o.after)
                res.outbound = outbound.stop()
                res.inbound = inbound.stop()
        except KeyboardInterrupt:
            res.error = "interrupted"
            self.say("interrupted: tearing down")
        except NatmigError as e:
            res.error = str(e)
            self.say(f"error: {e}")
        finally:
            self.say("teardown: traffic, agents, testbed")
            tear_down(self.say, [("outbound traffic", outbound.close if outbound else None), ("inbound traffic", inbound.close if inbound else None),
                                 ("agents", fleet.close if fleet else None), ("testbed", tb.down)])
            shutil.rmtree(work, ignore_errors=True)
        res.steps = self.steps
        m = res.migration
        res.ok = (res.error is None and m is not None and m.ok and res.flows_survived and res.block_after is not None
                  and res.block_after.seconds is not None and res.carried and res.attacker_reached.get("after") is False)
        if res.error is None and m is not None and not m.ok:
            res.error = m.error
        self.print_report(res)
        if o.json_path == "-":
            print(json.dumps(res.to_dict(), indent=2), flush=True)
        elif o.json_path:
            Path(o.json_path).write_text(json.dumps(res.to_dict(), indent=2))
        return res

    # ---------------------------------------------------- the agents, read

    @staticmethod
    def _node(fleet: AgentFleet, nat: str) -> StateNode:
        node = StateNode(fleet.endpoint(nat).open())  # type: ignore[arg-type]
        try:
            node.discover()
        except BaseException:
            node.close()
            raise
        return node

    def _stats(self, fleet: AgentFleet, nat: str) -> dict[str, tuple[int, str]]:
        with self._node(fleet, nat) as node:
            return node.statistics()

    def _block(self, fleet: AgentFleet, nat: str, address: str) -> BlockRead:
        """The address's entry of ``nat``'s blocked list, read back from its agent (seconds None: not blocked)."""
        with self._node(fleet, nat) as node:
            lst = _list(node, BLOCKED)
            at = time.monotonic()
            entries = node.read(lst)
        i, t = lst.index["address"], lst.index["timeout"]
        left = next((e[t] for e in entries if str(e[i]) == address), None)
        return BlockRead(nat, None if left is None else int(left), at)

    def _await_block(self, fleet: AgentFleet, nat: str, address: str, timeout: float = 5.0) -> BlockRead:
        """The block as soon as the agent lists it (it polls the kernel's set every second)."""
        deadline = time.monotonic() + timeout
        while True:
            b = self._block(fleet, nat, address)
            if b.seconds is not None:
                return b
            if time.monotonic() > deadline:
                raise ControllerError(f"{nat}: the attacker {address} is not in the blocked set {timeout:g} s after its flood")
            time.sleep(0.2)

    def _load(self, fleet: AgentFleet, nat: str, rows: list[dict[str, Any]], chunk: int = 50_000) -> None:
        """Write sessions into ``nat``'s table through its agent (candidate, commit)."""
        with self._node(fleet, nat) as node:
            lst = _list(node, SESSIONS)
            entries: list[Entry] = [e for e in (Wire.complete(lst, r) for r in rows) if e is not None]
            for i in range(0, len(entries), chunk):
                node.write(lst, entries[i:i + chunk])
                node.commit()

    # ------------------------------------------------------------ report

    def print_report(self, r: FirewallDemoResult) -> None:
        """What was moved, what survived, and where the attacker stands, as read back."""
        self.say("")
        self.say("=" * 72)
        if r.migration is not None:
            self.say(r.migration.text())
        for name, secs in r.steps.items():
            self.say(f"  step {name:<24} {ms(secs):>11}")
        for what, tr in (("client -> server", r.outbound), ("server -> web (inbound service)", r.inbound)):
            if tr is None:
                continue
            s = tr.summary()
            self.say(f"  {what}: flows that survived {s['live_survived']}/{s['live_flows']} (TCP {s['tcp']['survived']}/{s['tcp']['total']}, "
                     f"UDP {s['udp']['survived']}/{s['udp']['total']}); largest gap {s['largest_gap_ms']:.1f} ms")
            for b in s["broken"][:3]:
                self.say(f"    broken: {b['proto']} flow {b['fid']}: {b['why']}")
        b, a = r.block_before, r.block_after
        if b is not None:
            self.say(f"  attacker on {b.node} (source), read back before the move: blocked, {b.seconds} s left")
        if a is not None:
            if a.seconds is None:
                self.say(f"  attacker on {a.node} (target), read back after the move: NOT blocked")
            else:
                self.say(f"  attacker on {a.node} (target), read back {a.at - b.at if b else 0:.1f} s later: blocked, {a.seconds} s left "
                         f"({'carried' if r.carried else 'NOT carried'}: a new block would start at {r.block_timeout} s)")
        if "after" in r.attacker_reached:
            self.say(f"  attacker's connection to web after the move: {'ACCEPTED (the attacker is free)' if r.attacker_reached['after'] else 'dropped'}")
        if r.error:
            self.say(f"  error: {r.error}")
        verdict = "every flow survived and the attacker stayed blocked" if r.ok else "NOT every flow survived, or the attacker is not blocked as before"
        self.say(f"RESULT: {verdict}")


def _list(node: StateNode, qname: str) -> StateList:
    lst = next((l for l in node.lists if l.qname == qname), None)
    if lst is None:
        raise ControllerError(f"{node.name}: the agent serves no {qname} ({', '.join(l.qname for l in node.lists)})")
    return lst


def synthetic_fw_sessions(n: int, server: str = "203.0.113.200") -> list[dict[str, Any]]:
    """``n`` established sessions of made-up inside hosts (fw-state leaves), for a table to move: TCP and UDP alternate."""
    out = []
    for i in range(n):
        j = i // 2
        row: dict[str, Any] = {"protocol": "TCP" if i % 2 == 0 else "UDP", "src-address": f"10.0.0.{100 + j // 50000}",
                               "src-port": 1024 + j % 50000, "dst-address": server, "dst-port": 443, "timeout": 900, "assured": True}
        if i % 2 == 0:
            row["tcp-state"] = "ESTABLISHED"
        out.append(row)
    return out


def flood(ns: str, src: str, dst: str, port: int, count: int) -> None:
    """``count`` UDP datagrams from ``src`` in namespace ``ns``, each from a new source port: as many new connections."""
    def send() -> None:
        for _ in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((src, 0))
                s.sendto(b"x", (dst, port))
    netns.call_in(ns, send)


def reaches(ns: str, src: str, dst: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection from ``src`` in namespace ``ns`` to ``dst:port`` is accepted within ``timeout``."""
    def attempt() -> bool:
        with socket.socket() as s:
            s.settimeout(timeout)
            s.bind((src, 0))
            try:
                s.connect((dst, port))
            except OSError:
                return False
            return True
    return bool(netns.call_in(ns, attempt))
