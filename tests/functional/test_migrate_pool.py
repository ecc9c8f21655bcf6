"""Live migration of a NAT with a public address pool: a table spread over two addresses moves, flows alive."""

from __future__ import annotations

import time

import pytest

from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.controller.steering import TestbedSteering
from natmig.testbed import topology

from .helpers_migrate import bed, table, traffic

pytestmark = pytest.mark.root

POOL_FILE = topology.DEFAULT_TOPOLOGY.with_name("pool.toml")


def test_a_pooled_table_moves_and_every_flow_survives(tmp_path):
    with bed(tmp_path, "mp", POOL_FILE) as (tb, fleet):
        pool = tb.topology.public_pool("nat1")
        assert len(pool) == 2 and tb.public_addresses("nat2") == [e.address for e in pool]
        ss = synthetic_sessions(20_000, pool, servers=tb.topology.spare_addresses("public", 4))
        assert {s.translated_address for s in ss} == {e.address for e in pool}
        load_sessions(fleet.endpoint("nat1"), ss)
        with traffic(tb, tmp_path) as t:
            time.sleep(1.0)
            report = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb), MigrateOptions(retire="keep")).run()
            time.sleep(1.5)
            result = t.stop()
        assert report.ok, report.error
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why}" for b in result.broken()[:10]]
        assert result.live_survived == result.live_total == 10
        assert tb.active_nat() == "nat2"
        # Every session on the target with the mapping it had, on both pool addresses.
        moved = table(fleet, "nat2")
        assert all(moved.get(s.key) == (s.translated_address, s.translated_port) for s in ss)
        # The live flows left on a pool address, and kept it across the move.
        live = {v[0] for k, v in moved.items() if k[1] == tb.address("client")}
        assert live and live <= {e.address for e in pool}
