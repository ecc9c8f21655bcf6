"""verify by key range for real: two agents over SSH, conntrack in namespaces, the target losing sessions the source holds.

The target's kernel loses a few copied sessions after the copy (as closes
on the target after the switch do in a churn run): the whole digests
differ, and verify must read only the key ranges that differ on both
nodes -- a handful of sessions, not the table -- and still write the lost
ones back and report every session verified.
"""

from __future__ import annotations

import pytest

from natmig import netns
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.controller.steering import TestbedSteering
from natmig.model import key_range

from .helpers_migrate import bed, table

pytestmark = pytest.mark.root

N = 3000


def test_verify_reads_only_the_ranges_where_the_target_lost_sessions(tmp_path):
    with bed(tmp_path, "mr") as (tb, fleet):
        loaded = synthetic_sessions(N, tb.public_address, (20000, 29999))
        load_sessions(fleet.endpoint("nat1"), loaded)
        lost = loaded[100:107]

        def on_phase(ph):
            if ph.name == "copy":
                # Copied, digests not yet asked for: the target's kernel loses these (no agent involved).
                for s in lost:
                    netns.run(["conntrack", "-D", "-p", s.protocol.lower(), "-s", s.src_address, "--sport", str(s.src_port),
                               "-d", s.dst_address, "--dport", str(s.dst_port)], tb.netns("nat2"))

        report = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb), MigrateOptions(retire="keep"), on_phase).run()
        assert report.ok, report.error
        assert report.source_check == report.target_check == "ranges", (report.source_check, report.target_check)
        assert report.reconciled == len(lost) and report.verified == N
        # Read: the sessions of the ranges that differ on both nodes, a few at most per range (~N / 65,536 each).
        ranges = {key_range(s.key) for s in lost}
        assert report.range_sessions_read is not None and len(lost) <= report.range_sessions_read <= 3 * len(ranges), report.range_sessions_read
        verify = next(p for p in report.phases if p.name == "verify")
        assert "range-sessions" in verify.steps and "read" not in verify.steps, verify.steps
        assert f"{len(ranges)} of " in verify.detail, verify.detail
        src, tgt = table(fleet, "nat1"), table(fleet, "nat2")
        assert all(tgt.get(k) == v for k, v in src.items()), "the target lacks or re-maps a source session"
        assert all(s.key in tgt for s in lost)
