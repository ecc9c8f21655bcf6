"""Two machines joined by a tunnel, for real: each its own namespace and Open vSwitch daemons, an underlay between them.

testbed/topologies/two-hosts.toml: client and nat1 on machine A, server and
nat2 on machine B.  One testbed is shared by the module; a test that moves
the traffic puts it back.
"""

from __future__ import annotations

import tomllib

import pytest

from natmig import netns
from natmig.testbed import topology
from natmig.testbed.bed import Testbed
from natmig.testbed.build import UNDERLAY_MTU
from natmig.testbed.prefix import leftovers

from .test_testbed import _alive, _exchange

pytestmark = pytest.mark.root

TWO = topology.DEFAULT_TOPOLOGY.parent / "two-hosts.toml"
PUBLIC = "203.0.113.1"


@pytest.fixture(scope="module")
def tb():
    bed = Testbed.from_file(TWO, prefix=netns.run_prefix("mh"))
    with bed:
        pids = [p for ovs in bed.switches.values() for p in ovs.pids().values()]
        yield bed
    assert not any(leftovers(bed.prefix).values()), leftovers(bed.prefix)
    assert len(pids) == 4 and not any(_alive(p) for p in pids)


def _offloads_off(ns: str, ifname: str) -> bool:
    features = netns.run(["ethtool", "-k", ifname], ns).stdout
    return "tx-checksumming: off" in features and "generic-segmentation-offload: off" in features


def test_each_machine_runs_its_own_switch_with_the_underlay_address_and_tunnel_ports(tb):
    assert tb.healthy()
    pids = {m: ovs.pids() for m, ovs in tb.switches.items()}
    assert set(pids) == {"A", "B"} and all(len(p) == 2 for p in pids.values())
    assert not set(pids["A"].values()) & set(pids["B"].values())
    for m, addr in (("A", "198.51.100.1/24"), ("B", "198.51.100.2/24")):
        ns = tb.machine_netns(m)
        assert addr in netns.run(["ip", "-o", "-4", "addr", "show", "dev", "br-phy"], ns).stdout
        assert f"mtu {UNDERLAY_MTU}" in netns.run(["ip", "link", "show", "phy0"], ns).stdout
        kinds = tb.switches[m].vsctl("--columns=name,type", "find", "interface", "type=gre")
        assert kinds.count("gre") == 4
        # Offloads off on every veth end, the switch side included (field notes: TCP stalls otherwise).
        for ifname in ("phy0", *(n for n in tb.switch_ports(m) if not n.startswith("t"))):
            assert _offloads_off(ns, ifname), (m, ifname)
    for m in ("A", "B"):
        assert _offloads_off(tb.underlay_netns, f"u-{m}")
    # The data networks are not on the underlay, and the management network is elsewhere.
    assert "10.0.0" not in netns.run(["ip", "-o", "addr"], tb.underlay_netns).stdout


@pytest.mark.parametrize("proto,port", [("tcp", 7101), ("udp", 7102)])
def test_traffic_crosses_the_tunnel_with_the_public_address_and_a_port_of_nat1(tb, proto, port):
    before = tb.port_counters()
    ip, public_port = _exchange(tb, proto, port)
    assert ip == PUBLIC and 20000 <= public_port <= 29999
    after = tb.port_counters()
    # Out of nat1's public leg on A, into the server's port on B: only the tunnel joins them.
    # (Kernel counters of veths; a userspace tunnel port's own counters lag.)
    assert after["nat1-out"].rx_packets > before["nat1-out"].rx_packets
    assert after["server"].tx_packets > before["server"].tx_packets
    held = {n: tb.exec(n, ["conntrack", "-L", "-p", proto, "--dport", str(port)], check=False).stdout for n in ("nat1", "nat2")}
    assert f"dport={port}" in held["nat1"] and f"dport={port}" not in held["nat2"], held


def test_point_to_the_other_machine_moves_traffic_and_back(tb):
    assert tb.active_nat() == "nat1"
    try:
        tb.point_to("nat2")
        assert tb.active_nat() == "nat2"
        ip, _ = _exchange(tb, "tcp", 7103)
        assert ip == PUBLIC
        # The connection is in nat2's conntrack table only (both NATs see the hosts' ARP, so packet counts would not tell).
        held = {n: tb.exec(n, ["conntrack", "-L", "-p", "tcp", "--dport", "7103"], check=False).stdout for n in ("nat1", "nat2")}
        assert "dport=7103" in held["nat2"] and "dport=7103" not in held["nat1"], held
    finally:
        tb.point_to("nat1")
    assert tb.active_nat() == "nat1"


def test_testbed_status_from_the_command_line_shows_each_machine(tb, capsys):
    import json

    from natmig.cli import main

    assert main(["testbed", "status", "--prefix", tb.prefix, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["healthy"] and st["active_nat"] == "nat1" and st["underlay"]["tunnel"] == "gre"
    assert {m: (sw["underlay"], sw["nodes"], len(sw["daemons"])) for m, sw in st["machines"].items()} == {
        "A": ("198.51.100.1", ["client", "nat1"], 2), "B": ("198.51.100.2", ["server", "nat2"], 2)}
    assert main(["testbed", "status", "--prefix", tb.prefix]) == 0
    out = capsys.readouterr().out
    assert "machine A (198.51.100.1: client, nat1)" in out and "underlay: 198.51.100.0/24" in out


@pytest.mark.parametrize("tunnel", ["vxlan", "geneve"])
def test_vxlan_and_geneve_carry_the_traffic_too_and_a_failed_run_leaves_nothing(tunnel):
    doc = tomllib.loads(TWO.read_text())
    doc["underlay"]["tunnel"] = tunnel
    bed = Testbed(topology.parse(doc, f"two-hosts ({tunnel})"), netns.run_prefix("mt"))
    with pytest.raises(RuntimeError, match="failed here"):
        with bed:
            pids = [p for ovs in bed.switches.values() for p in ovs.pids().values()]
            assert bed.switches["A"].vsctl("--columns=type", "find", "interface", f"type={tunnel}").count(tunnel) == 4
            ip, public_port = _exchange(bed, "tcp", 7104)
            assert ip == PUBLIC and 20000 <= public_port <= 29999
            raise RuntimeError("the test failed here")  # teardown on failure, too
    assert not any(leftovers(bed.prefix).values())
    assert len(pids) == 4 and not any(_alive(p) for p in pids)
    assert not [ns for ns in netns.list_netns() if ns.startswith(f"{bed.prefix}-")]
