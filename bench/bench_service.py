"""Benchmark: a migration through the controller service against the one-shot CLI, at 0, 10,000 and 100,000 sessions.

One testbed, both NAT agents calling home to a `natmig controller` process
(in the management namespace, as in `natmig demo --via-controller`).  For
each table size N:

1. N sessions are loaded into the side that holds the traffic;
2. **one-shot**: `natmig migrate --inventory INV` with `[migration] engine =
   "generic"` and the testbed's switch: the same engine the service runs,
   in a process that connects to both agents, discovers their modules and
   compiles them, moves the state and the traffic, and exits;
3. **service**: `natmig migrate --inventory CTL --controller`, the move back:
   that process only asks the controller's northbound, which runs the engine
   on the sessions the agents opened when they called home.

Both are the command a user types, so both pay Python's start-up; the
figures beside them are the commands' wall time, the report's connect +
preflight (SSH sessions, discovery, locks: what a migration spends before it
changes anything) and the report's total, as each report printed them.
Target: the service's connect + preflight at most a fifth of the one-shot's
(issue: "preflight should all but vanish").

Run as root: ``.venv/bin/python bench/bench_service.py [--sizes 0,10000,100000] [--out DIR]`` (about 3 minutes on a quiet machine; figures in docs/controller-service.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, verdict

from natmig import netns
from natmig.controller.agentfleet import AgentFleet
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.inventory import dump_toml
from natmig.controller.demoservice import ControllerService
from natmig.testbed.bed import Testbed

NATMIG = [sys.executable, "-m", "natmig.cli"]
#: Both commands get the same confirm timeout, longer than the default 10 s: at 100,000 sessions the
#: generic engine's read of the NAT's list alone can outlast 10 s on a loaded two-core machine, and
#: the source's freeze would roll back under the copy (docs/engine.md).
CONFIRM_TIMEOUT = "60"
#: the service's connect + preflight against the one-shot's, at most.
PREFLIGHT_RATIO = 0.2


def _phase_ms(report: str, phase: str) -> float | None:
    m = re.search(rf"^\s+{re.escape(phase)}\s+([\d.]+) ms", report, re.M)
    return float(m.group(1)) if m else None


def _before_copy(report: str) -> float | None:
    """Connect + preflight: what a migration spends before it changes anything (the one-shot's SSH sessions are in connect)."""
    c, p = _phase_ms(report, "connect"), _phase_ms(report, "preflight")
    return None if c is None or p is None else round(c + p, 1)


def _total_ms(report: str) -> float | None:
    m = re.search(r"^\s+total\s+([\d.]+) ms", report, re.M)
    return float(m.group(1)) if m else None


def _run(argv: list[str], what: str) -> tuple[float, str]:
    t = time.perf_counter()
    # Niced like the controller service (and the agents): both control planes get the same share of the
    # two cores beside the switch and the hosts.
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=1800, preexec_fn=lambda: os.nice(19))
    wall = time.perf_counter() - t
    if cp.returncode != 0:
        raise SystemExit(f"{what}: exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return wall, cp.stdout


def measure(fleet: AgentFleet, service: ControllerService, tb: Testbed, n: int, work: Path) -> dict:
    """One size: one-shot nat1 -> nat2, then the service nat2 -> nat1."""
    if n:
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(n, tb.public_address, tb.topology.nats["nat1"].port_range))
    doc = fleet.inventory_doc("nat1", "nat2")
    doc["migration"]["engine"] = "generic"
    oneshot_inv = work / "oneshot.toml"
    oneshot_inv.write_text(dump_toml(doc))
    one_wall, one_out = _run([*NATMIG, "migrate", "-i", str(oneshot_inv), "--confirm-timeout", CONFIRM_TIMEOUT], f"one-shot migrate of {n}")
    ctl_inv = service.write_inventory("nat2", "nat1")
    svc_wall, svc_out = _run([*NATMIG, "migrate", "-i", str(ctl_inv), "--controller", "--confirm-timeout", CONFIRM_TIMEOUT], f"migrate --controller of {n}")
    row = {"sessions": n,
           "oneshot": {"wall": one_wall, "preflight_ms": _before_copy(one_out), "total_ms": _total_ms(one_out)},
           "service": {"wall": svc_wall, "preflight_ms": _before_copy(svc_out), "total_ms": _total_ms(svc_out)}}
    a, b = row["oneshot"]["preflight_ms"], row["service"]["preflight_ms"]
    row["preflight_ratio"] = (b / a) if a and b is not None else None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0,10000,100000")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    prefix = netns.run_prefix("bs")
    work = Path(tempfile.mkdtemp(prefix="natmig-bench-service-"))
    tb = Testbed.from_file(None, prefix)
    fleet: AgentFleet | None = None
    service: ControllerService | None = None
    rows = []
    try:
        tb.up()
        netns.ensure_conntrack_capacity(2 * max(sizes) + 65536)
        fleet = AgentFleet(tb, work)
        service = ControllerService.for_fleet(tb, fleet)
        service.start()
        for nat in tb.topology.nats:
            fleet.start(nat)
        service.wait_up(set(tb.topology.nats))
        for n in sizes:
            rows.append(measure(fleet, service, tb, n, work))
            r = rows[-1]
            print(f"{n:>7} sessions: one-shot {r['oneshot']['wall'] * 1000:.0f} ms (connect+preflight {r['oneshot']['preflight_ms']} ms), "
                  f"service {r['service']['wall'] * 1000:.0f} ms (connect+preflight {r['service']['preflight_ms']} ms)", flush=True)
    finally:
        if service is not None:
            service.close()
        if fleet is not None:
            fleet.close()
        tb.down()
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        "migration through the controller service vs the one-shot CLI (generic engine, live switch; wall = the command's)",
        ["sessions", "one-shot wall", "one-shot connect+preflight", "one-shot total", "service wall", "service connect+preflight", "service total",
         f"preflight ratio (<= {PREFLIGHT_RATIO})"],
        [[r["sessions"], f"{r['oneshot']['wall'] * 1000:.0f} ms", f"{r['oneshot']['preflight_ms']} ms", f"{r['oneshot']['total_ms']} ms",
          f"{r['service']['wall'] * 1000:.0f} ms", f"{r['service']['preflight_ms']} ms", f"{r['service']['total_ms']} ms",
          f"{r['preflight_ratio']:.3f} {verdict(r['preflight_ratio'], PREFLIGHT_RATIO)}" if r["preflight_ratio"] is not None else "n/a"]
         for r in rows])
    out = Path(args.out) / "bench_service.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out}")
    missed = [r for r in rows if r["preflight_ratio"] is None or r["preflight_ratio"] > PREFLIGHT_RATIO]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
