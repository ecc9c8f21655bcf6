"""The controller at 100 hosts and 1,000 NAT instances, simulated: planning (measured) and scheduling (modelled).

No network: the planning figures run natmig's own fabric planner
(:mod:`natmig.controller.fabric`) on fabrics of that size and time it; the
scheduling figures come from an event simulation of migrations sharing
resources (each host's CPU, each switch, the controller's CPU, the
management network), with per-session costs taken from the measurements in
docs/controller.md.  docs/scale.md explains the model and the figures.

    .venv/bin/python bench/scale_sim.py            # prints every table
"""

from __future__ import annotations

import argparse
import heapq
import time
from dataclasses import dataclass

from natmig.controller import fabric as fb
from natmig.controller.plan import NatPorts

# ------------------------------------------------------------------ costs
# Per-session CPU seconds, from the 10k and 100k runs of docs/controller.md
# ("Where the time goes"): the source's read (conntrack -L + encode), the
# controller's forwarding, the target's write (decode + ctnetlink creates),
# each side's digest for verify, the source's delete at retire.
SOURCE_READ = 15e-6
CONTROLLER = 7.4e-6     # 0.74 s of controller CPU for a 100k migration
TARGET_WRITE = 13e-6
DIGEST = 3.2e-6         # verify ~0.64 s at 100k, both agents in parallel
RETIRE = 6e-6
#: Bytes per session on the management network (the codec's XML form, SSH framing included).
SESSION_BYTES = 260
#: Fixed latencies of a migration with its SSH sessions kept open (preflight reads, catch-up settle, admit).
FIXED = 0.036 + 0.014 + 0.004
#: A new SSH session (key exchange + auth, both ends' CPU): paid per agent when sessions are not kept.
SSH_SETUP = 0.05
#: One OpenFlow bundle on one switch (ovs-ofctl: ~12 ms, of which ~5 ms process start; a resident
#: OpenFlow connection saves the start).
BUNDLE = 0.012


@dataclass
class Resource:
    """A resource shared equally by the jobs using it (processor sharing).

    ``capacity`` units of work per second in all, at most ``per_job`` for one
    job (one job uses one core of a host; one SSH stream has its own ceiling).
    """

    name: str
    capacity: float
    per_job: float
    used: float = 0.0  # capacity-seconds used (for utilisation)

    def rate(self, users: int) -> float:
        """Work per second each of ``users`` jobs gets."""
        return min(self.per_job, self.capacity / users)


@dataclass
class Job:
    """One NAT instance's migration: phases, each some work on one resource (None: a pure delay)."""

    name: str
    phases: list[tuple[str, str | None, float]]
    start: float = 0.0
    end: float = 0.0
    hold_start: float = 0.0
    hold: float = 0.0
    i: int = 0
    left: float = 0.0


def migration(name: str, sessions: int, src: str, dst: str, switches: list[str], kept: bool) -> Job:
    """The phases of one migration of ``sessions`` from host ``src`` to host ``dst`` through ``switches`` (one bundle each, in order)."""
    phases: list[tuple[str, str | None, float]] = []
    if not kept:
        phases += [("connect", f"cpu:{src}", SSH_SETUP), ("connect", f"cpu:{dst}", SSH_SETUP)]
    phases += [
        ("preflight", None, 0.036),
        # The copy is a pipeline in natmig (read, forward, write overlap);
        # modelled in sequence, an upper bound on its length.
        ("copy", f"cpu:{src}", sessions * SOURCE_READ),
        ("copy", "controller", sessions * CONTROLLER),
        ("copy", "mgmt", sessions * SESSION_BYTES * 2),
        ("copy", f"cpu:{dst}", sessions * TARGET_WRITE),
        ("catch-up", None, 0.014),
    ]
    phases += [("switch", f"switch:{s}", BUNDLE) for s in switches]
    phases += [("verify", f"cpu:{dst}", sessions * DIGEST), ("admit", None, 0.004), ("retire", f"cpu:{src}", sessions * RETIRE)]
    return Job(name, phases)


def simulate(jobs: list[Job], resources: dict[str, Resource], parallel: int) -> float:
    """Run ``jobs`` in order, at most ``parallel`` at once; returns when the last one ends (seconds)."""
    waiting = list(jobs)
    running: list[Job] = []
    delays: list[tuple[float, int, Job]] = []
    now, seq, live = 0.0, 0, 0

    def begin(j: Job) -> None:
        nonlocal seq, live
        if j.i >= len(j.phases):
            j.end = now
            live -= 1
            return
        phase, res, work = j.phases[j.i]
        if phase == "catch-up":
            j.hold_start = now  # the source is frozen from here to the target's admit
        if phase == "retire" and not j.hold:
            j.hold = now - j.hold_start
        if res is None:
            seq += 1
            heapq.heappush(delays, (now + work, seq, j))
        else:
            j.left = work
            running.append(j)

    def admit() -> None:
        nonlocal live
        while waiting and live < parallel:
            j = waiting.pop(0)
            live += 1
            j.start = now
            begin(j)

    admit()
    while running or delays:
        users: dict[str, int] = {}
        for j in running:
            r = j.phases[j.i][1]
            assert r is not None
            users[r] = users.get(r, 0) + 1
        rates = {j.name: resources[j.phases[j.i][1] or ""].rate(users[j.phases[j.i][1] or ""]) for j in running}
        step = min((j.left / rates[j.name] for j in running), default=float("inf"))
        if delays:
            step = min(step, delays[0][0] - now)
        for j in running:
            j.left -= step * rates[j.name]
            r = resources[j.phases[j.i][1] or ""]
            r.used += step * rates[j.name]
        now += step
        done = [j for j in running if j.left <= 1e-12]
        for j in done:
            running.remove(j)
        while delays and delays[0][0] <= now + 1e-12:
            done.append(heapq.heappop(delays)[2])
        for j in done:
            j.i += 1
            begin(j)
        admit()
    return now


def host_resources(hosts: int, cores: int, controller_cores: int, mgmt_gbit: float) -> dict[str, Resource]:
    """Each host's CPU and switch, the controller's CPU, the management network."""
    res = {f"cpu:h{i}": Resource(f"cpu:h{i}", cores, 1.0) for i in range(hosts)}
    res.update({f"switch:h{i}": Resource(f"switch:h{i}", 1.0, 1.0) for i in range(hosts)})
    res["controller"] = Resource("controller", controller_cores, 1.0)
    # One SSH stream carried ~100 MB/s on loopback (asyncssh, 16 MiB window).
    res["mgmt"] = Resource("mgmt", mgmt_gbit * 1e9 / 8, 100e6)
    return res


def utilisation(r: Resource, total: float) -> float:
    return r.used / (r.capacity * total) if total else 0.0


# ------------------------------------------------------------------ planning


def big_fabric(machines: int, client_machines: int) -> fb.Fabric:
    """A fabric of ``machines`` switches in a full mesh, one NAT each, hosts on the first ``client_machines``."""
    names = [f"h{i}" for i in range(machines)]
    ms = {}
    for i, m in enumerate(names):
        hosts = {"inside": (1,), "public": (2,)} if i < client_machines else {"inside": (), "public": ()}
        tunnels = {(q, net, d): 200 + 4 * j + fb.tunnel_code(net, d) for j, q in enumerate(names) if q != m for net in ("inside", "public") for d in fb.DIRECTIONS}
        ms[m] = fb.MachinePorts(m, hosts, {f"nat{i}": NatPorts(100, 101)}, tunnels)
    return fb.Fabric("br-int", ms, "02:6e:6d:00:00:01", 100, 0x6E6D)


def planning_table() -> None:
    print("Planning with natmig's fabric planner (measured on this machine):")
    print(f"  {'switches in the fabric':>24} {'client machines':>16} {'steps':>6} {'flows':>6} {'plan_move ms':>13}")
    for machines, clients in ((5, 3), (20, 3), (100, 3), (100, 100)):
        f = big_fabric(machines, clients)
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 0.5 or n < 2:
            steps = fb.plan_move(f, "nat0", f"nat{machines - 1}")
            n += 1
        took = (time.perf_counter() - t0) / n
        print(f"  {machines:>24} {clients:>16} {len(steps):>6} {sum(len(s.flows) for s in steps):>6} {took * 1000:>13.2f}")


# ------------------------------------------------------------------ scenarios


def drain_table(sessions: int, nats: int, cores: int) -> None:
    print(f"\nDraining one host ({nats} NAT instances of {sessions:,} sessions each, clients on 3 machines) to another; {cores} cores per host, controller 4 cores, 10 Gbit/s management:")
    print(f"  {'parallel':>8} {'kept sessions':>14} {'total s':>8} {'largest hold ms':>16} {'busiest resource':>28}")
    for kept in (True, False):
        for parallel in (1, 2, 4, 8, nats):
            res = host_resources(6, cores, 4, 10)
            jobs = [migration(f"nat{i}", sessions, "h0", "h1", ["h1", "h2", "h3", "h4", "h0"], kept) for i in range(nats)]
            total = simulate(jobs, res, parallel)
            hold = max(j.hold for j in jobs)
            busiest = max(res.values(), key=lambda r: utilisation(r, total))
            print(f"  {parallel:>8} {'yes' if kept else 'no':>14} {total:>8.2f} {hold * 1000:>16.0f} {busiest.name + f' {utilisation(busiest, total):.0%}':>28}")


def fleet_table(sessions: int, hosts: int, per_host: int, cores: int) -> None:
    nats = hosts * per_host
    print(f"\nRolling maintenance: every one of {hosts} hosts drained in turn to the next ({nats:,} migrations of {sessions:,} sessions), {cores} cores per host:")
    print(f"  {'parallel':>8} {'total min':>10} {'largest hold ms':>16} {'controller CPU':>15} {'mgmt GB':>8} {'bundles':>8}")
    for parallel in (8, 32, 100, 300):
        res = host_resources(hosts, cores, 4, 10)
        jobs = []
        for h in range(hosts):
            for k in range(per_host):
                dst = (h + 1) % hosts
                clients = [f"h{(h + 2 + k + d) % hosts}" for d in range(3)]
                jobs.append(migration(f"h{h}n{k}", sessions, f"h{h}", f"h{dst}", [f"h{dst}", *clients, f"h{h}"], True))
        total = simulate(jobs, res, parallel)
        hold = max(j.hold for j in jobs)
        print(f"  {parallel:>8} {total / 60:>10.2f} {hold * 1000:>16.0f} {utilisation(res['controller'], total):>15.0%} "
              f"{nats * sessions * SESSION_BYTES * 2 / 1e9:>8.1f} {sum(len([p for p in j.phases if p[0] == 'switch']) for j in jobs):>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=10_000, help="sessions per NAT instance (default 10,000)")
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--per-host", type=int, default=10, help="NAT instances per host (default 10: 1,000 at 100 hosts)")
    p.add_argument("--cores", type=int, default=8, help="cores per host")
    a = p.parse_args(argv)
    planning_table()
    drain_table(a.sessions, a.per_host, a.cores)
    drain_table(a.sessions, a.per_host, 2)
    fleet_table(a.sessions, a.hosts, a.per_host, a.cores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
