"""What the live-migration tests share: a testbed with both agents, live traffic, a node's table."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from natmig import netns
from natmig.netns import ensure_conntrack_capacity
from natmig.controller.agentfleet import AgentFleet
from natmig.controller.traffic import LiveTraffic, TrafficSpec
from natmig.testbed.bed import Testbed
from natmig.testbed.prefix import leftovers


@contextmanager
def bed(tmp_path: Any, tag: str, topology: Any = None) -> Iterator[tuple[Testbed, AgentFleet]]:
    """A testbed (of ``topology``, default the demo's) with both agents running (nat1 active), torn down afterwards, also on failure."""
    ensure_conntrack_capacity(200_000)
    tb = Testbed.from_file(topology, prefix=netns.run_prefix(tag))
    fleet = None
    try:
        tb.up()
        fleet = AgentFleet(tb, tmp_path / "agents")
        fleet.start("nat1")
        fleet.start("nat2")
        yield tb, fleet
    finally:
        if fleet is not None:
            fleet.close()
        tb.down()
    assert not any(leftovers(tb.prefix).values())


def traffic(tb: Testbed, tmp_path: Any, **kw: Any) -> LiveTraffic:
    """5 TCP + 5 UDP live flows every 10 ms unless told otherwise."""
    spec = TrafficSpec(**{"tcp": 5, "udp": 5, "interval": 0.01, **kw})
    return LiveTraffic(tb.netns("client"), tb.netns("server"), tb.address("server"), spec, str(tmp_path))


def table(fleet: AgentFleet, nat: str) -> dict[tuple, tuple[str, int]]:
    """A node's sessions as key -> (public address, public port), read through its agent."""
    node = fleet.endpoint(nat).open()
    try:
        return {s.key: (s.translated_address, s.translated_port) for s in node.get_sessions("running")}
    finally:
        node.close()
