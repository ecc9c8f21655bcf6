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
the end, also on failure or Ctrl-C.  :class:`AgentFleet` is reused by the
functional tests and the benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from .. import children, netns, pool
from ..errors import ControllerError, NatmigError, UsageError
from ..model import NatSession
from ..pool import PublicRange
from .inventory import AgentSpec, dump_toml, parse
from .migrate import Endpoint, MigrateOptions, Migration, endpoint_from_spec
from .report import MigrationReport, PhaseTiming, format_report, ms
from .steering import TestbedSteering
from .traffic import LiveTraffic, TrafficSpec
from .trafficresult import TrafficResult

USER = "natmig"
AGENT_PORT = 830


class AgentFleet:
    """One natmig agent per NAT node of a testbed, with fresh credentials, and the inventory to reach them.

    Agents are child processes of this one, stopped by their own pid.
    """

    def __init__(self, tb: Any, workdir: str | Path, provider: str = "conntrack", port: int = AGENT_PORT, nice: int = 19,
                 call_home: str | None = None) -> None:
        from ..credentials import load_or_create_host_key, set_password

        self.tb = tb
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.provider = provider
        self.port = port
        self.nice = nice
        #: HOST[:PORT] of a controller service the agents call home to (RFC 8071), or None.
        self.call_home = call_home
        self.procs: dict[str, subprocess.Popen] = {}
        self.password = os.urandom(12).hex()
        self.passwords = self.dir / "agent-passwords"
        set_password(self.passwords, USER, self.password)
        self.secret = self.dir / "controller-password"
        self.secret.write_text(self.password + "\n")
        self.secret.chmod(0o600)
        # The controller signs in with a key (a password check is a ~50 ms
        # scrypt on the agent); the password stays valid for people.
        import asyncssh

        ckey = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = self.dir / "controller-key"
        fd = os.open(self.client_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ckey.export_private_key("openssh"))
        # One authorized_keys file per user (the agent's --authorized-keys has %u).
        self.authorized_keys = self.dir / "authorized_keys.%u"
        (self.dir / f"authorized_keys.{USER}").write_bytes(ckey.export_public_key("openssh"))
        self.known_hosts = self.dir / "known_hosts"
        lines = []
        for nat in tb.topology.nats:
            key = load_or_create_host_key(self.host_key(nat))
            pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
            lines.append(f"[{tb.mgmt_address(nat)}]:{port} {pub}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def host_key(self, nat: str) -> Path:
        """Where ``nat``'s agent keeps its host key."""
        return self.dir / f"{nat}-host-key"

    def start(self, nat: str, timeout: float = 30.0) -> int:
        """Start ``nat``'s agent in its namespace; returns its pid once it listens."""
        return self.start_all([nat], timeout)[nat]

    def start_all(self, nats: Sequence[str], timeout: float = 60.0) -> dict[str, int]:
        """Start the agents of ``nats`` all at once (their start-ups overlap), then wait until each listens; their pids."""
        ready = {nat: self._spawn(nat) for nat in nats}
        for nat, path in ready.items():
            children.wait_ready(self.procs[nat], path, timeout, f"agent of {nat}", partial(self.log_tail, nat), ControllerError)
        return {nat: self.procs[nat].pid for nat in nats}

    def _spawn(self, nat: str) -> Path:
        """Start ``nat``'s agent process; the file it writes once it listens."""
        ready = self.dir / f"{nat}.ready"
        ready.unlink(missing_ok=True)
        log = open(self.dir / f"{nat}-agent.log", "ab")
        # A firewall translates nothing: it has no public address to serve.
        public = [] if self.provider == "firewall" else [arg for a in self.tb.public_addresses(nat) for arg in ("--public-address", a)]
        argv = [
            sys.executable, "-m", "natmig.cli", "agent", "--netns", self.tb.netns(nat),
            "--listen", f"{self.tb.mgmt_address(nat)}:{self.port}", "--provider", self.provider,
            *public, "--host-key", str(self.host_key(nat)),
            "--passwords", str(self.passwords), "--authorized-keys", str(self.authorized_keys), "--ready-file", str(ready),
            # A restarted agent undoes what it had pending (an interrupted migration's confirmed commits).
            "--state-dir", str(self.dir / f"{nat}-state"),
        ]
        if self.call_home:
            argv += ["--call-home", self.call_home]
        # The agents run niced: on this one machine the switch (a userspace
        # OVS) and the hosts stand in for hardware and other machines, and a
        # control plane busy serialising 100k sessions must not starve them;
        # on a real node the kernel datapath preempts the agent anyway.
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, self.nice))
        log.close()
        self.procs[nat] = p
        return ready

    def log_tail(self, nat: str, n: int = 1500) -> str:
        """The end of an agent's log (for error messages)."""
        try:
            return (self.dir / f"{nat}-agent.log").read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self, nat: str, kill: bool = False) -> None:
        """Stop ``nat``'s agent (SIGTERM, or SIGKILL with ``kill``) and wait for it."""
        children.stop(self.procs.pop(nat, None), kill)

    def spec(self, nat: str) -> AgentSpec:
        """How the controller reaches ``nat``'s agent."""
        return AgentSpec(
            name=nat, host=self.tb.mgmt_address(nat), port=self.port, username=USER,
            key=str(self.client_key), known_hosts=str(self.known_hosts),
            public_address=self._public(nat), netns=self.tb.mgmt_netns,
        )

    def _public(self, nat: str) -> str | list[str]:
        """The inventory's public_address of ``nat``: its address, or its pool's as a list."""
        addrs = self.tb.public_addresses(nat)
        return addrs[0] if len(addrs) == 1 else addrs

    def endpoint(self, nat: str, timeout: float = 30.0) -> Endpoint:
        """A migration endpoint for ``nat`` (``timeout``: of each RPC, in seconds); ``stop`` stops its agent."""
        ep = endpoint_from_spec(self.spec(nat), timeout=timeout)
        ep.stop = lambda: self.stop(nat)
        return ep

    def inventory_doc(self, source: str, target: str) -> dict[str, Any]:
        """The inventory (as a document) that `natmig migrate --inventory` takes for this testbed."""
        agents = {}
        topo = self.tb.topology
        for nat in topo.nats:
            s = self.spec(nat)
            agents[nat] = {k: v for k, v in (
                ("host", s.host), ("port", s.port), ("username", s.username), ("key", s.key),
                ("known_hosts", s.known_hosts), ("public_address", s.public_address), ("netns", s.netns),
                # Where each NAT runs and which instance it is a node of: what a drain selects and pairs by.
                ("machine", topo.nats[nat].machine or None),
                ("networks", list(topo.nats[nat].pair) if topo.nats[nat].pair != ("inside", "public") else None),
            ) if v is not None}
        doc = {"agents": agents, "switch": {"testbed": self.tb.prefix}, "migration": {"source": source, "target": target}}
        parse(doc)  # what we write must load
        return doc

    def write_inventory(self, source: str, target: str) -> Path:
        """Write the inventory as TOML in the work directory; returns its path."""
        p = self.dir / "inventory.toml"
        p.write_text(dump_toml(self.inventory_doc(source, target)))
        return p

    def close(self) -> None:
        """Stop every agent this fleet started."""
        for nat in list(self.procs):
            self.stop(nat)


#: Made-up inside hosts are 10.0.0.100 and up, 50,000 source ports each.
_FIRST_HOST, _LAST_HOST, _PORTS_PER_HOST = 100, 254, 50_000


def synthetic_sessions(
    n: int,
    public: str | Sequence[PublicRange],
    nat_ports: tuple[int, int] | None = None,
    servers: Sequence[str] = ("203.0.113.200",),
    timeout: int = 900,
) -> list[NatSession]:
    """``n`` established sessions of made-up inside hosts, for a table to move.

    ``public`` is the NAT's public address with ``nat_ports`` its port range,
    or its pool (each address with its ranges).  The sessions' public ports
    lie outside the NAT's own ranges of their address, so they never collide
    with a mapping the NAT gives live traffic.  They are spread over the
    pool's addresses in turn, TCP and UDP alternate, and a public port is
    used again towards the next of ``servers`` once every free port of every
    address is taken, as Linux SNAT reuses a public port across destinations:
    2 x (free ports of the pool) x (servers) fit, ~109,000 per address and server
    beside a 10,000-port range.  ``timeout``: each session's remaining
    lifetime in seconds; a table must outlive what is measured on it (the
    kernel removes each entry when its timer runs out).
    """
    if not 1 <= timeout <= 0xFFFFFFFF:
        raise ControllerError(f"synthetic sessions: timeout {timeout} s is not within 1..{0xFFFFFFFF} (nat-session's timeout leaf)")
    if isinstance(public, str):
        if nat_ports is None:
            raise ControllerError("synthetic sessions: give the NAT's port range with its public address")
        public = (PublicRange(public, nat_ports),)
    entries = pool.check("synthetic sessions: pool", list(public))
    if not servers:
        raise ControllerError("synthetic sessions: no server address to open them towards")
    slots = _free_slots(entries)
    fit = 2 * len(slots) * len(servers)
    most_inside = 2 * (_LAST_HOST - _FIRST_HOST + 1) * _PORTS_PER_HOST
    if n > min(fit, most_inside):
        raise ControllerError(
            f"--sessions {n}: at most {min(fit, most_inside)} synthetic sessions fit beside the NAT's port ranges "
            f"({len(pool.addresses(entries))} public address(es), {len(slots)} free public ports in all, "
            f"{len(servers)} server(s), TCP and UDP); give the NAT a larger pool or the sessions more servers")
    out = []
    for i in range(n):
        proto = "TCP" if i % 2 == 0 else "UDP"
        j = i // 2
        addr, port = slots[j % len(slots)]
        out.append(NatSession(
            proto, f"10.0.0.{_FIRST_HOST + j // _PORTS_PER_HOST}", 1024 + j % _PORTS_PER_HOST,
            servers[j // len(slots)], 443, addr, port,
            "ESTABLISHED" if proto == "TCP" else None, timeout, True,
        ))
    return out


def _free_slots(entries: Sequence[PublicRange]) -> list[tuple[str, int]]:
    """Every (address, port) of the pool outside the NAT's own ranges, ports 1024 and up, the addresses taking turns."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        ranges.setdefault(e.address, []).append(e.ports)
    free = {a: [p for p in range(1024, 65536) if not any(lo <= p <= hi for lo, hi in rs)] for a, rs in ranges.items()}
    slots: list[tuple[str, int]] = []
    for k in range(max(map(len, free.values()))):
        slots += [(a, ports[k]) for a, ports in free.items() if k < len(ports)]
    return slots


def load_sessions(ep: Endpoint, sessions: list[NatSession], chunk: int = 50_000, target: str = "running") -> None:
    """Write sessions into a node's table through its agent, ``chunk`` an edit-config.

    Into running by default: the agent then reads only the entries an edit
    names (a ctnetlink GET each).  An edit of the candidate copies the whole
    running table first, and a commit compares it whole, so loading in
    chunks that way costs O(table) per chunk: at 1,000,000 sessions the 11th
    chunk of 50,000 outlasted the 30 s RPC timeout (measured, contended).
    ``target="candidate"`` commits after each chunk.
    """
    node = ep.open()
    try:
        for i in range(0, len(sessions), chunk):
            node.edit_sessions(sessions[i:i + chunk], target=target, operation="merge")
            if target == "candidate":
                node.commit()
    finally:
        node.close()


@contextmanager
def control_plane_priority(nice: int = 19) -> Iterator[None]:
    """Run the calling process (the controller) niced, and restore its priority afterwards.

    On this one machine the userspace switch and the hosts stand in for
    hardware and other machines; a controller parsing 100k-session replies
    must not take their CPU.  Call it after the testbed is up, so the switch
    daemons it starts are not niced.
    """
    old = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, old)


def tear_down(say: Callable[[str], None], parts: list[tuple[str, Callable[[], object] | None]]) -> None:
    """Run each part's teardown in order, going on past failures (each one said)."""
    for what, fn in parts:
        if fn is None:
            continue
        try:
            fn()
        except Exception as e:  # keep tearing down the rest
            say(f"teardown of {what} failed: {e}")


def phase_line(ph: PhaseTiming) -> str:
    """One phase of a migration as the demos print it while it runs."""
    steps = ", ".join(f"{k} {ms(v)}" for k, v in ph.steps.items())
    return f"      {ph.name:<10} {ms(ph.seconds):>10}  {'ok' if ph.ok else 'FAILED'}" + (f"  ({steps})" if steps else "")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C while a demo runs, so its teardown runs too."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
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
        """The command line that makes the same move."""
        return f"natmig migrate --inventory {inventory}"

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


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(opts: DemoOptions) -> int:
    """Run the demo of ``opts.nf``; exit status 0 only when every flow survived (and, for the firewall, the block was carried)."""
    # With --json - standard output carries the JSON alone; progress and the report go to stderr.
    out = sys.stderr if opts.json_path == "-" else sys.stdout
    if opts.nf == "firewall":
        from .fwdemo import FirewallDemo

        return 0 if FirewallDemo(opts, out).run().ok else 1
    return 0 if Demo(opts, out).run().ok else 1
