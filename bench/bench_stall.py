"""Benchmark: what reading a NAT node's digest costs the packets going through the node.

The agent answers nat-statistics (count and digest of its conntrack table)
from its live digest (agent/ctdigest.py).  Each call must leave out what has
expired.  It used to do that with a ctnetlink dump that matches nothing
(``ctevents.expire``): the kernel walks its whole hash table in one go,
removing what has expired.  The walk runs with the CPU's softirqs off, so
every packet through the machine waits for it.  Now the digest looks up by
key only the entries whose timeout has run out (``ctdeadlines.Deadlines``).

On the pool testbed, with ``--sessions`` synthetic sessions created in each
NAT namespace and a 1 ms TCP probe through nat1, for ``--seconds`` each:

* idle: the probe alone;
* walk: ``ctevents.expire`` every EVERY seconds in nat1 and in nat2 (two
  processes, niced as the agents are);
* digest: ``LiveDigest.statistics()`` every EVERY seconds in both (the same).

Prints, for each, the probe's largest gap, and writes
bench_stall.json to ``--out``.  No target: the figures go beside the
migration's probe gap (docs/controller.md).  Run as root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from natmig import netns  # noqa: E402
from natmig.agent import ctbulk, ctevents  # noqa: E402
from natmig.agent.ctdigest import LiveDigest  # noqa: E402
from natmig.agent.ctread import EntryReader  # noqa: E402
from natmig.controller.demosessions import synthetic_sessions  # noqa: E402
from natmig.controller.traffic import LiveTraffic, TrafficSpec  # noqa: E402
from natmig.testbed import topology  # noqa: E402
from natmig.testbed.bed import Testbed  # noqa: E402

NICE = 10  # what the agents run at in the benchmarks (controller.agentfleet.AgentFleet)
KINDS = ("idle", "walk", "digest")
#: Seconds between two calls of a caller: a call now and then, as a controller asks, not a busy loop.
EVERY = 0.1


class _Caller:
    """A forked child, niced, that prepares (a digest's full read) and then, once told, makes one call after another in ``ns``."""

    def __init__(self, ns: str, kind: str, seconds: float) -> None:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.nice(NICE)
                call: Callable[[], object]
                if kind == "walk":
                    sock = ctevents.request_socket(ns)
                    call = lambda: ctevents.expire(sock)  # noqa: E731
                else:
                    digest = LiveDigest(ns, EntryReader(ns), lambda: None)
                    digest.statistics()  # the full read: not part of what is measured
                    call = digest.statistics
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    call()
                    time.sleep(EVERY)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(go_r)
        self._ready, self._go = ready_r, go_w

    def ready(self) -> None:
        os.read(self._ready, 1)

    def go(self) -> None:
        os.write(self._go, b"g")

    def wait(self) -> None:
        os.waitpid(self.pid, 0)
        os.close(self._ready)
        os.close(self._go)


def measure(tb: Testbed, work: str, seconds: float) -> dict:
    probe = LiveTraffic(tb.netns("client"), tb.netns("server"), tb.address("server"), TrafficSpec(tcp=1, udp=0, interval=0.001), work)
    spans: dict[str, tuple[float, float]] = {}
    with probe:
        time.sleep(0.5)
        for kind in KINDS:
            callers = [] if kind == "idle" else [_Caller(tb.netns(n), kind, seconds) for n in ("nat1", "nat2")]
            for c in callers:
                c.ready()
            start = time.perf_counter()
            for c in callers:
                c.go()
            if not callers:
                time.sleep(seconds)
            for c in callers:
                c.wait()
            spans[kind] = (start, time.perf_counter())
            time.sleep(0.3)
        traffic = probe.stop()
    out: dict = {kind: {"largest_gap_ms": traffic.largest_gap_during(*span)[0] * 1000} for kind, span in spans.items()}
    out["probe_survived"] = traffic.all_survived
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000, help="synthetic sessions created in each NAT namespace (default 100000)")
    ap.add_argument("--seconds", type=float, default=3.0, help="how long each case runs (default 3)")
    ap.add_argument("--out", default=".", help="directory for bench_stall.json")
    a = ap.parse_args(argv)
    if a.sessions < 0 or a.seconds <= 0:
        ap.error("--sessions must be >= 0 and --seconds > 0")
    tb = Testbed.from_file(topology.DEFAULT_TOPOLOGY.with_name("pool.toml"), prefix=netns.run_prefix("st"))
    work = tempfile.mkdtemp(prefix="natmig-bench-")
    try:
        tb.up()
        for nat in ("nat1", "nat2"):
            table = synthetic_sessions(a.sessions, tb.topology.public_pool(nat), servers=tb.topology.spare_addresses("public", 16), timeout=86_400)
            refused = ctbulk.create_sessions(tb.netns(nat), [(s, 86_400) for s in table])
            if refused:
                print(f"bench_stall: {len(refused)} of {a.sessions} sessions refused in {nat}")
                return 1
        load = os.getloadavg()[0]
        r = measure(tb, work, a.seconds)
    finally:
        tb.down()
    print(f"{a.sessions} sessions in each NAT namespace; the 1 ms probe's largest gap over {a.seconds:g} s (load average {load:.1f}):")
    for kind in KINDS:
        print(f"  {kind:<7} {r[kind]['largest_gap_ms']:8.1f} ms")
    r.update(sessions=a.sessions, seconds=a.seconds, load_average=load)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_stall.json").write_text(json.dumps(r, indent=2))
    return 0 if r["probe_survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
