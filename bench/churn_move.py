"""One move under churn: the connections held in its hold window, and every flow that did not survive, with why.

bench_migrate's churn run comes after its three floors and its probe-only
move, and a run of ``--sizes 1000000`` takes half an hour; this runs the
move under churn alone.  One testbed (bench_migrate's: topologies/pool.toml,
both NAT nodes with their agents), N sessions loaded into nat1 through its
agent, each agent's digest caught up, then natmig nat1 -> nat2 (retire=keep)
beside a 1 ms TCP probe and 100 new TCP connections a second, the traffic
running as long as the move may (its confirm timeout, at least 300 s).

It prints one JSON object: the report's phases and steps, how the copy was
verified, the hold window, the new connections held in it and their
slowest connect, and each flow that did not survive with the reason its
ends gave.  ``--keep-logs DIR`` copies the two agents' logs there.  Exit
status 1 when the move failed or a flow did not survive.

Run as root: ``.venv/bin/python bench/churn_move.py [--sessions 1000000] [--keep-logs DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from natmig import netns
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.traffic import TrafficSpec
from natmig.errors import NatmigError
from natmig.netns import ensure_conntrack_capacity
from natmig.testbed import topology
from natmig.testbed.bed import Testbed

from bench_migrate import Timeouts, _caught_up, _migrate, _new_connections, flush, reset  # noqa: E402
from engines import ENGINES  # noqa: E402
from common import SESSION_TIMEOUT, agents_on, in_child  # noqa: E402

#: Flows listed by name in the output (the count is always given).
SHOWN = 50


def main(argv: list[str] | None = None) -> int:
    """Load, move under churn, print what the move and the traffic saw."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=1_000_000, help="sessions loaded into nat1 (default 1000000)")
    ap.add_argument("--keep-logs", default=None, help="copy the two agents' logs into this directory")
    ap.add_argument("--engine", choices=ENGINES, default="generic", help="natmig migrate's default, the generic engine (default), or the NAT's own")
    ap.add_argument("--after-move", action="store_true",
                    help="first a move without churn, then traffic pointed back and nat2 emptied (bench_migrate's order)")
    a = ap.parse_args(argv)
    if a.sessions < 0:
        ap.error(f"--sessions {a.sessions}: give a table of 0 or more sessions")
    ensure_conntrack_capacity(2 * a.sessions + 65536)
    work = Path(tempfile.mkdtemp(prefix="natmig-churn-"))
    tb = Testbed.from_file(topology.DEFAULT_TOPOLOGY.with_name("pool.toml"), prefix=netns.run_prefix("cm"))
    n = a.sessions
    try:
        with agents_on(tb, work / "agents", ["nat1", "nat2"]) as fleet:
            reset(tb)
            t = time.perf_counter()
            if n:
                in_child(lambda: load_sessions(fleet.endpoint("nat1"), synthetic_sessions(
                    n, tb.topology.public_pool("nat1"), servers=tb.topology.spare_addresses("public", 16), timeout=SESSION_TIMEOUT)))
            load_s = time.perf_counter() - t
            timeouts = Timeouts.for_table(n)
            _caught_up(fleet, timeouts)
            first = None
            if a.after_move:
                # As bench_migrate's churn run: its probe-only move kept the source's entries (retire=keep).
                first, _ = _migrate(tb, fleet, work, TrafficSpec(tcp=1, udp=0, interval=0.001, duration=timeouts.traffic), timeouts,
                                    engine=a.engine)
                tb.point_to("nat1")
                flush(tb, "nat2")
                _caught_up(fleet, timeouts)
            spec = TrafficSpec(tcp=1, udp=0, interval=0.001, churn=100, churn_life=0.1, duration=timeouts.traffic)
            report, traffic = _migrate(tb, fleet, work, spec, timeouts, engine=a.engine)
            lost = [f for f in traffic.flows if not f.survived]
            row = {
                "sessions": n, "load_seconds": load_s,
                "first_move": None if first is None else {"ok": first.ok, "error": first.error, "total": first.total_seconds},
                "ok": report.ok, "error": report.error,
                "total": report.total_seconds,
                "phases": {p.name: {"seconds": p.seconds, **p.steps} for p in report.phases},
                "details": {p.name: p.detail for p in report.phases if getattr(p, "detail", "")},
                "copied": report.copied, "caught_up": report.caught_up, "reconciled": report.reconciled,
                "verified": report.verified, "source_check": report.source_check, "target_check": report.target_check,
                "range_sessions_read": report.range_sessions_read,
                **_new_connections(report, traffic),
                "flows": len(traffic.flows), "flows_lost": len(lost),
                "lost": [{"fid": f.fid, "kind": f.kind, "proto": f.proto, "why": f.why, "error": f.error} for f in lost[:SHOWN]],
            }
            print(json.dumps(row, indent=1), flush=True)
    except (NatmigError, RuntimeError) as e:  # RuntimeError: what failed in the load's child (in_child)
        print(f"churn_move: {e}", file=sys.stderr)
        return 1
    finally:
        if a.keep_logs:
            dest = Path(a.keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for f in (work / "agents").glob("*.log"):
                shutil.copy(f, dest / f.name)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if row["ok"] and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
