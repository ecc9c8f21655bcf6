"""Benchmark: draining a machine of 8 NAT instances, 1, 2, 4 and 8 moves at a time.

On testbed/topologies/eight-nats.toml (8 instances on machine A, their
idle twins on B, GRE between them; 16 agents), with 1,000 sessions loaded
into each instance and live flows through each (3 TCP + 3 UDP, a message
every 10 ms), for N = 1, 2, 4, 8: drain A to B N at a time (the code of
`natmig drain`: one Migration per instance, each with its own instance's
steering), then drain back untimed (8 at a time) for the next N.

Prints per N the wall time, how many moved, and per instance the hold (its
source's admission closed to its target's open), the switch phase (four
bundles over two switches, each waited for until its datapath revalidated)
and the largest gap its live flows saw; then where the time of a move goes
(the median of each phase over the moves of that N), and the machine's
load.  Writes bench_drain.json.  Exit status 1 when a move failed or a flow
broke; there is no time target (how it scales on this two-core machine is
the result; docs/multihost.md).

Run as root: ``.venv/bin/python bench/bench_drain.py [--parallel 1,2,4,8] [--sessions 1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402

from natmig import netns  # noqa: E402
from natmig.controller.agentfleet import AgentFleet  # noqa: E402
from natmig.controller.demorun import control_plane_priority  # noqa: E402
from natmig.controller.demosessions import load_sessions, synthetic_sessions  # noqa: E402
from natmig.controller.drain import Drain, DrainOptions, DrainReport, pair_moves  # noqa: E402
from natmig.controller.inventory import load  # noqa: E402
from natmig.controller.migrate import endpoint_from_spec  # noqa: E402
from natmig.controller.steering import steering_from_spec  # noqa: E402
from natmig.controller.traffic import LiveTraffic, TrafficSpec  # noqa: E402
from natmig.controller.trafficresult import TrafficResult  # noqa: E402
from natmig.testbed import topology  # noqa: E402
from natmig.testbed.bed import Testbed  # noqa: E402
from natmig.testbed.prefix import leftovers  # noqa: E402

EIGHT = topology.DEFAULT_TOPOLOGY.parent / "eight-nats.toml"
PHASES = ("preflight", "copy", "catch-up", "switch", "verify", "admit", "retire")


def _drain(inv_path: Path, frm: str, to: str, parallel: int) -> DrainReport:
    inv = load(inv_path)
    assert inv.switch is not None
    switch = inv.switch
    moves = pair_moves(inv, frm, to)
    with control_plane_priority():
        return Drain(moves, lambda n: endpoint_from_spec(inv.agent(n, "agent")), lambda s: steering_from_spec(switch, s),
                     DrainOptions(parallel)).run(frm, to)


def _traffic(tb: Testbed, work: Path, tag: str) -> tuple[ExitStack, dict[int, LiveTraffic]]:
    stack = ExitStack()
    flows = {}
    for i in range(1, 9):
        d = work / f"traffic-{tag}-{i}"
        d.mkdir()
        flows[i] = stack.enter_context(LiveTraffic(tb.netns(f"c{i}"), tb.netns("server"), tb.address("server"),
                                                   TrafficSpec(tcp=3, udp=3, interval=0.01, port=5000 + i), str(d)))
    return stack, flows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; non-zero when a move failed or a live flow broke."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parallel", default="1,2,4,8", help="moves at a time, comma-separated (default %(default)s)")
    ap.add_argument("--sessions", type=int, default=1000, help="sessions loaded into each instance (default %(default)s)")
    ap.add_argument("--out", default=".", help="directory for bench_drain.json")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_drain: needs root (namespaces, Open vSwitch)")
        return 1
    levels = [int(x) for x in a.parallel.split(",")]
    work = Path(tempfile.mkdtemp(prefix="natmig-bench-drain-"))
    netns.ensure_conntrack_capacity(200_000)
    tb = Testbed.from_file(EIGHT, netns.run_prefix("bd"))
    fleet = None
    rows: list[dict[str, Any]] = []
    ok = True
    try:
        t0 = time.perf_counter()
        tb.up()
        up = time.perf_counter() - t0
        fleet = AgentFleet(tb, work / "agents")
        t0 = time.perf_counter()
        fleet.start_all(list(tb.topology.nats))
        agents = time.perf_counter() - t0
        print(f"eight-nats up in {up:.1f} s, its 16 agents in {agents:.1f} s; load average {os.getloadavg()[0]:.2f}")
        servers = tb.topology.spare_addresses("public", 4)
        for i in range(1, 9):
            load_sessions(fleet.endpoint(f"a{i}"), synthetic_sessions(a.sessions, tb.topology.public_pool(f"a{i}"), servers=servers))
        inv = fleet.write_inventory("a1", "b1")
        for n in levels:
            load_before = os.getloadavg()[0]
            stack, flows = _traffic(tb, work, f"n{n}")
            with stack:
                time.sleep(0.8)
                report = _drain(inv, "A", "B", n)
                time.sleep(1.0)
                results: dict[int, TrafficResult] = {i: f.stop() for i, f in flows.items()}
            row = _row(n, report, results, load_before)
            rows.append(row)
            ok &= row["moved"] == 8 and row["flows_survived"]
            _print(row)
            back = _drain(inv, "B", "A", 8)
            if not back.ok:
                print(back.text())
                ok = False
                break
    finally:
        if fleet is not None:
            fleet.close()
        tb.down()
    left = {k: v for k, v in leftovers(tb.prefix).items() if v}
    if left:
        print(f"leftovers after down: {left}")
    _summary(rows)
    Path(a.out, "bench_drain.json").write_text(json.dumps({"sessions_per_instance": a.sessions, "testbed_up_s": up, "agents_up_s": agents,
                                                           "rows": rows}, indent=2) + "\n")
    return 0 if ok and not left and rows else 1


def _row(n: int, report: DrainReport, results: dict[int, TrafficResult], load_before: float) -> dict[str, Any]:
    per = []
    for r in report.results:
        i = int(r.move.source[1:])
        rep = r.report
        per.append({"instance": i, "ok": r.ok, "sessions": r.sessions, "move_s": r.ended - r.started,
                    "hold_s": rep.blackout_seconds if rep is not None else None,
                    "switch_s": rep.phase_seconds("switch") if rep is not None else None,
                    "phases_s": {p: rep.phase_seconds(p) for p in PHASES} if rep is not None else {},
                    "largest_gap_s": results[i].largest_gap, "survived": results[i].all_survived,
                    "traffic_on": rep.traffic_on if rep is not None else None})
    holds = [p["hold_s"] for p in per if p["hold_s"] is not None]
    return {"parallel": n, "wall_s": report.seconds, "moved": report.moved, "instances": per,
            "largest_hold_s": max(holds) if holds else None, "largest_gap_s": max(p["largest_gap_s"] for p in per),
            "flows_survived": all(p["survived"] for p in per),
            "median_phase_s": {ph: statistics.median(p["phases_s"].get(ph, 0.0) for p in per) for ph in PHASES},
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def _print(row: dict[str, Any]) -> None:
    print_table(f"drain A -> B, {row['parallel']} at a time: {row['moved']}/8 moved in {row['wall_s']:.2f} s "
                f"(load average {row['load_before']:.1f} before, {row['load_after']:.1f} after)",
                ["instance", "result", "sessions", "move", "hold", "switch", "largest gap", "flows", "traffic on"],
                [[p["instance"], "ok" if p["ok"] else "FAILED", p["sessions"], f"{p['move_s'] * 1000:.0f} ms",
                  f"{p['hold_s'] * 1000:.0f} ms" if p["hold_s"] is not None else "-",
                  f"{p['switch_s'] * 1000:.0f} ms" if p["switch_s"] is not None else "-",
                  f"{p['largest_gap_s'] * 1000:.0f} ms", "all survived" if p["survived"] else "BROKEN", p["traffic_on"]]
                 for p in row["instances"]])


def _summary(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print_table("drain of 8 instances: total wall time, largest hold and gap, and where a move's time goes (median per phase)",
                ["N at a time", "wall", "largest hold", "largest gap", *PHASES],
                [[r["parallel"], f"{r['wall_s']:.2f} s", f"{(r['largest_hold_s'] or 0) * 1000:.0f} ms", f"{r['largest_gap_s'] * 1000:.0f} ms",
                  *(f"{r['median_phase_s'][p] * 1000:.0f}" for p in PHASES)] for r in rows])
    print("(phases in ms; the switch phase is four bundles over two switches, each waited for until the datapath revalidated)")


if __name__ == "__main__":
    sys.exit(main())
