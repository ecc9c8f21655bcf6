"""A migration whose verify must find differences: N sessions moved, K of them deleted from the target's kernel after the copy.

What verify costs when the two nodes' digests differ, without waiting for a
churn run to make them differ: the target loses K copied sessions (deleted
by ctnetlink, no agent involved) once the copy is done, before the digests
are asked for; verify must find them and write them back.  Prints (and
writes with ``--out``) verify's time and steps, the blackout, how many
sessions verify read by key range, and the controller's peak RSS over the
move.  Root; builds its own testbed (topologies/pool.toml) and takes it down.

Not one of the ``bench_*`` benchmarks ``make bench`` runs: it has no target,
it compares code (run it from two checkouts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from natmig import netns  # noqa: E402
from natmig.agent.ctbulk import delete_sessions  # noqa: E402
from natmig.controller.demosessions import load_sessions, synthetic_sessions  # noqa: E402
from natmig.controller.migrate import MigrateOptions, Migration  # noqa: E402
from natmig.controller.steering import TestbedSteering  # noqa: E402
from natmig.errors import NatmigError  # noqa: E402
from natmig.netns import ensure_conntrack_capacity  # noqa: E402
from natmig.testbed import topology  # noqa: E402
from natmig.testbed.bed import Testbed  # noqa: E402

from common import agents_on, in_child, reset_peak_rss, vm_hwm_mb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run one forced migration; exit 1 when it failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000, help="sessions moved (default 100000)")
    ap.add_argument("--lost", type=int, default=200, help="of them, deleted from the target after the copy (default 200)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    if a.sessions < 1 or not 0 <= a.lost <= a.sessions - 1000:
        ap.error(f"--sessions {a.sessions} --lost {a.lost}: need at least 1 session, and at most sessions - 1000 lost")
    n, k = a.sessions, a.lost
    ensure_conntrack_capacity(2 * n + 65536)
    work = Path(tempfile.mkdtemp(prefix="natmig-forced-"))
    tb = Testbed.from_file(topology.DEFAULT_TOPOLOGY.with_name("pool.toml"), prefix=netns.run_prefix("fv"))
    try:
        with agents_on(tb, work / "agents", ["nat1", "nat2"]) as fleet:
            def table() -> list:
                return synthetic_sessions(n, tb.topology.public_pool("nat1"), servers=tb.topology.spare_addresses("public", 16), timeout=3600)

            lost = table()[1000:1000 + k]
            # Loaded from a child: the table's objects are not resident in this process, the controller.
            in_child(lambda: load_sessions(fleet.endpoint("nat1"), table()))

            def on_phase(ph) -> None:
                if ph.name == "copy":
                    delete_sessions(tb.netns("nat2"), lost)

            reset_peak_rss(os.getpid())
            before = vm_hwm_mb(os.getpid())
            opts = MigrateOptions(retire="keep", confirm_timeout=max(120, int(0.9e-3 * n)))
            r = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb), opts, on_phase).run()
            verify = next((p for p in r.phases if p.name == "verify"), None)
            res = {"sessions": n, "lost": k, "ok": r.ok, "error": r.error,
                   "verify_seconds": r.phase_seconds("verify"), "verify_steps": verify.steps if verify else {},
                   "verify_detail": verify.detail if verify else "", "blackout_seconds": r.blackout_seconds,
                   "total_seconds": r.total_seconds, "reconciled": r.reconciled, "verified": r.verified,
                   "source_check": r.source_check, "target_check": r.target_check,
                   # getattr: the same script measures a checkout from before verify by range.
                   "range_sessions_read": getattr(r, "range_sessions_read", None),
                   "controller_rss_before_mb": before, "controller_peak_rss_mb": vm_hwm_mb(os.getpid()),
                   "load_average": os.getloadavg()}
    except NatmigError as e:
        print(f"forced_verify: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
