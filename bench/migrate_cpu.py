"""Where a migration's CPU goes: the CPU seconds of each process over natmig's move, beside its phases and steps.

One testbed (bench_migrate's: topologies/pool.toml, both NAT nodes with
their agents), N sessions loaded into nat1 through its agent, then natmig
nat1 -> nat2 (retire=keep, no probe, no floors) ``--runs`` times, nat2
emptied before each.  For each move it prints one JSON line: the total,
each phase with its steps, the load average before and after, and the CPU
seconds (user + system, from /proc/PID/stat) of the source agent, of what
it ran and waited for (its ``conntrack -L``), of the target agent (and its
children) and of this process, the controller.

The copy is CPU-bound on two cores shared by these processes: the wall
times move with whatever else runs on the machine, the CPU seconds much
less, which is what makes two trees comparable on a busy machine (see
docs/controller.md, "Where a 100k copy's time goes").

Run as root: ``.venv/bin/python bench/migrate_cpu.py [--sessions 100000] [--runs 2] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from natmig import netns
from natmig.controller.demorun import control_plane_priority
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.errors import NatmigError
from natmig.netns import ensure_conntrack_capacity
from natmig.testbed import topology
from natmig.testbed.bed import Testbed

from bench_migrate import Timeouts, _caught_up, back_to_nat1, reset  # noqa: E402
from engines import ENGINES, move  # noqa: E402
from common import SESSION_TIMEOUT, agents_on, in_child  # noqa: E402


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own user + system CPU seconds, those of its children it waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # After the ")" of the command name: utime, stime, cutime, cstime are fields 11-14.
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def main(argv: list[str] | None = None) -> int:
    """Run the moves; one JSON line each (and all of them in ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000, help="sessions loaded into nat1 (default 100000)")
    ap.add_argument("--runs", type=int, default=2, help="moves of that table, nat2 emptied before each (default 2)")
    ap.add_argument("--engine", choices=ENGINES, default="generic",
                    help="natmig migrate's default, the generic engine (default), or the NAT's own migration, on the same table")
    ap.add_argument("--out", default=None, help="also write the lines as one JSON list to this file")
    a = ap.parse_args(argv)
    if a.sessions < 0 or a.runs < 1:
        ap.error(f"--sessions {a.sessions} --runs {a.runs}: give a table of 0 or more sessions and at least one run")
    ensure_conntrack_capacity(2 * a.sessions + 65536)
    work = Path(tempfile.mkdtemp(prefix="natmig-cpu-"))
    tb = Testbed.from_file(topology.DEFAULT_TOPOLOGY.with_name("pool.toml"), prefix=netns.run_prefix("mc"))
    rows = []
    try:
        with agents_on(tb, work / "agents", ["nat1", "nat2"]) as fleet:
            reset(tb)
            n = a.sessions
            if n:
                in_child(lambda: load_sessions(fleet.endpoint("nat1"), synthetic_sessions(
                    n, tb.topology.public_pool("nat1"), servers=tb.topology.spare_addresses("public", 16), timeout=SESSION_TIMEOUT)))
            timeouts = Timeouts.for_table(n)
            pids = {"source": fleet.procs["nat1"].pid, "target": fleet.procs["nat2"].pid}
            for _ in range(a.runs):
                back_to_nat1(tb)
                _caught_up(fleet, timeouts)  # each agent's digest has followed the flush
                load_before = os.getloadavg()[0]
                before = {role: cpu_seconds(pid) for role, pid in pids.items()}
                own = os.times()
                with control_plane_priority():
                    report = move(a.engine, fleet, tb, timeouts.rpc, timeouts.confirm)
                own_after = os.times()
                after = {role: cpu_seconds(pid) for role, pid in pids.items()}
                row = {
                    "engine": a.engine, "sessions": n, "ok": report.ok, "error": report.error, "total": report.total_seconds,
                    "load": [load_before, os.getloadavg()[0]],
                    "phases": {p.name: {"seconds": p.seconds, **p.steps} for p in report.phases},
                    "cpu": {**{role: after[role][0] - before[role][0] for role in pids},
                            **{f"{role}_children": after[role][1] - before[role][1] for role in pids},
                            "controller": (own_after.user - own.user) + (own_after.system - own.system)},
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    except (NatmigError, RuntimeError) as e:  # RuntimeError: what failed in the load's child (in_child)
        print(f"migrate_cpu: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
