"""The emulated network for real: namespaces, a private Open vSwitch, nftables NAT nodes.

One testbed (the demo topology) is shared by the module to keep the run
short; tests that move the traffic put it back.  Tests of crash clean-up use
testbeds of their own prefixes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from natmig import netns
from natmig.testbed.bed import Testbed
from natmig.testbed.prefix import leftovers

pytestmark = pytest.mark.root

PORTS = (20000, 29999)
SERVER = "203.0.113.100"


@pytest.fixture(scope="module")
def tb():
    with Testbed.from_file(None, prefix=netns.run_prefix("tb")) as bed:
        yield bed
    assert not any(leftovers(bed.prefix).values())


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for init to reap it is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _nothing_left(prefix: str) -> dict[str, list]:
    return {k: v for k, v in leftovers(prefix).items() if v}


# A one-shot server: prints "ready", then the peer of the first TCP
# connection (or UDP datagram) as "ip port", and echoes the payload back.
_SERVER = r"""
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
if proto == "tcp":
    s.listen(1)
print("ready", flush=True)
s.settimeout(10)
if proto == "tcp":
    c, peer = s.accept()
    data = c.recv(100)
    c.sendall(data)
    c.close()
else:
    data, peer = s.recvfrom(100)
    s.sendto(data, peer)
print(peer[0], peer[1], flush=True)
"""

_CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if proto == "tcp":
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"natmig")
    print(s.recv(100).decode())
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"natmig", (host, port))
    print(s.recvfrom(100)[0].decode())
"""


def _exchange(tb: Testbed, proto: str, port: int) -> tuple[str, int]:
    """Client sends to the server through the active NAT; returns the peer address the server saw."""
    srv = subprocess.Popen(
        netns.ns_cmd([sys.executable, "-c", _SERVER, proto, str(port)], tb.netns("server")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert srv.stdout.readline().strip() == "ready", srv.stderr.read()
        echoed = tb.exec("client", [sys.executable, "-c", _CLIENT, proto, SERVER, str(port)], timeout=15).stdout.strip()
        out, err = srv.communicate(timeout=10)
    finally:
        srv.kill()
        srv.wait()
    assert echoed == "natmig"
    ip, p = out.split()
    return ip, int(p)


def test_nodes_have_their_addresses_and_no_route_off_the_machine(tb):
    st = tb.status()
    assert st["healthy"] and st["active_nat"] == "nat1"
    assert st["nodes"]["client"]["addresses"] == {"eth0": ["10.0.0.10/24"]}
    assert st["nodes"]["server"]["addresses"] == {"eth0": ["203.0.113.100/24"]}
    for nat in ("nat1", "nat2"):
        assert st["nodes"][nat]["addresses"]["inside0"] == ["10.0.0.1/24"]
        assert st["nodes"][nat]["addresses"]["outside0"] == ["203.0.113.1/24"]
    assert st["nodes"]["nat2"]["addresses"]["mgmt0"] == ["192.0.2.2/24"]
    # No namespace of the testbed has a default route or any route via a
    # gateway other than the NAT's inside address.
    for ns in netns.list_netns(f"{tb.prefix}-"):
        routes = netns.run(["ip", "-4", "route", "show"], ns).stdout
        assert "default" not in routes, (ns, routes)
        for line in routes.splitlines():
            if " via " in line:
                assert line.split()[:3] == ["203.0.113.0/24", "via", "10.0.0.1"], (ns, line)
    # The root namespace has nothing of the data network, and no link of ours.
    root_addrs = netns.run(["ip", "-4", "-o", "addr", "show"]).stdout
    assert " 10.0.0." not in root_addrs and " 203.0.113." not in root_addrs
    assert leftovers(tb.prefix)["root_links"] == []
    # IPv6 is off in the nodes (no router solicitations on the switch).
    assert netns.run(["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"], tb.netns("client")).stdout.strip() == "1"


def test_switch_is_userspace_datapath_in_secure_mode_with_offloads_off(tb):
    out = tb.ovs.vsctl("get", "bridge", tb.bridge, "datapath_type", "fail_mode").split()
    assert out == ["netdev", "secure"]
    for port in tb.switch_ports():
        features = netns.run(["ethtool", "-k", port], tb.switch_netns).stdout
        assert "tcp-segmentation-offload: off" in features and "tx-checksumming: off" in features, port


def test_ovsdb_replica_reports_the_planned_port_numbers(tb):
    from natmig.errors import TestbedError
    from natmig.testbed import ovsdb

    got = ovsdb.bridge_ofports(tb.ovs.db_sock, tb.bridge)
    assert got == tb.switch_ports() and tb.bridge not in got
    with pytest.raises(TestbedError, match="bridge 'nosuchbr' is not in the database"):
        ovsdb.bridge_ofports(tb.ovs.db_sock, "nosuchbr")


def test_ping_tcp_and_udp_cross_nat1_with_the_public_address_and_a_port_of_its_range(tb):
    before = tb.nat_counters()
    assert before["nat2"] == 0  # idle from the start: the switch has sent it nothing
    tb.exec("client", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SERVER])
    ip, port = _exchange(tb, "tcp", 8080)
    assert ip == tb.public_address and PORTS[0] <= port <= PORTS[1]
    ip, port = _exchange(tb, "udp", 8081)
    assert ip == tb.public_address and PORTS[0] <= port <= PORTS[1]
    after = tb.nat_counters()
    assert after["nat1"] - before["nat1"] >= 8  # 2 pings, TCP handshake+data, UDP, both ways
    assert after["nat2"] == before["nat2"]  # the idle NAT receives nothing
    conns = tb.exec("nat1", ["conntrack", "-L", "-p", "tcp"], check=False).stdout
    assert "dport=8080" in conns


def test_point_to_moves_both_directions_to_nat2_atomically(tb):
    try:
        took = tb.point_to("nat2")
        assert tb.active_nat() == "nat2"
        table = " ".join(tb.ovs.dump_flows(tb.bridge))
        nat1_ports = (tb.switch_ports()["nat1-in"], tb.switch_ports()["nat1-out"])
        assert all(f"output:{p}" not in table for p in nat1_ports)  # nothing is sent to nat1 any more
        before = tb.port_counters()
        tb.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER])
        ip, port = _exchange(tb, "tcp", 8082)
        after = tb.port_counters()
        assert ip == tb.public_address and PORTS[0] <= port <= PORTS[1]
        delta = {name: after[name].tx_packets - before[name].tx_packets for name in after}
        assert delta["nat2-in"] >= 3 and delta["nat2-out"] >= 3, delta
        assert delta["nat1-in"] == 0 and delta["nat1-out"] == 0, delta
        # The new sessions live in nat2's conntrack table, not in nat1's.
        assert "dport=8082" in tb.exec("nat2", ["conntrack", "-L", "-p", "tcp"], check=False).stdout
        assert "dport=8082" not in tb.exec("nat1", ["conntrack", "-L", "-p", "tcp"], check=False).stdout
        assert took < 1.0
        # What the old NAT still sends (packets in flight at the move) reaches
        # the client: nat1 pings the client; its packets (ARP or ICMP) arrive,
        # while what the client answers goes to the active nat2.
        before = tb.port_counters()
        tb.exec("nat1", ["ping", "-c", "1", "-W", "1", tb.address("client")], check=False)
        after = tb.port_counters()
        assert after["nat1-in"].rx_packets > before["nat1-in"].rx_packets
        assert after["client"].tx_packets > before["client"].tx_packets
        assert after["nat1-in"].tx_packets == before["nat1-in"].tx_packets
    finally:
        tb.point_to("nat1")
    assert tb.active_nat() == "nat1"


def test_management_network_reaches_each_nat_agent_address(tb):
    for nat in ("nat1", "nat2"):
        addr = tb.mgmt_address(nat)
        netns.run(["ping", "-c", "1", "-W", "2", addr], tb.mgmt_netns)
        # A listener on the management address in the NAT's namespace, reached
        # from this (root-namespace) process through tb.mgmt_socket.
        srv = subprocess.Popen(
            netns.ns_cmd([sys.executable, "-c", _SERVER.replace('"0.0.0.0"', repr(addr)), "tcp", "8300"], tb.netns(nat)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert srv.stdout.readline().strip() == "ready", srv.stderr.read()
            with tb.mgmt_socket(nat, 8300) as s:
                s.sendall(b"hello")
                assert s.recv(100) == b"hello"
            peer_ip, _ = srv.communicate(timeout=5)[0].split()
        finally:
            srv.kill()
            srv.wait()
        assert peer_ip == tb.controller_address
    # The management network is not the data network: the client cannot reach it.
    assert tb.exec("client", ["ping", "-c", "1", "-W", "1", tb.mgmt_address("nat1")], check=False).returncode != 0


def test_up_is_idempotent(tb):
    pids = tb.ovs.pids()
    assert tb.up() is False
    assert tb.ovs.pids() == pids and tb.healthy()


def test_up_rebuilds_a_damaged_testbed(tb):
    netns.delete(tb.netns("client"))
    assert not tb.healthy() and tb.status()["nodes"]["client"]["exists"] is False
    assert tb.up() is True
    assert tb.healthy() and tb.active_nat() == "nat1"
    tb.exec("client", ["ping", "-c", "1", "-W", "2", SERVER])


def test_two_testbeds_with_different_prefixes_coexist(tb):
    with Testbed.from_file(None, prefix=netns.run_prefix("tc")) as other:
        assert other.prefix != tb.prefix
        other.exec("client", ["ping", "-c", "1", "-W", "2", SERVER])
        tb.exec("client", ["ping", "-c", "1", "-W", "2", SERVER])
        other.point_to("nat2")
        assert other.active_nat() == "nat2" and tb.active_nat() == "nat1"
    assert _nothing_left(other.prefix) == {}


def test_down_after_a_test_that_failed_half_way_leaves_nothing():
    prefix = netns.run_prefix("tf")
    with pytest.raises(RuntimeError):
        with Testbed.from_file(None, prefix=prefix) as bed:
            pids = list(bed.ovs.pids().values())
            raise RuntimeError("the test failed here")
    assert _nothing_left(prefix) == {}
    assert pids and not any(_alive(p) for p in pids)


def test_an_up_that_fails_half_way_removes_what_it_made(monkeypatch):
    from natmig.agent.natnode import NatNode, NatNodeError
    from natmig.errors import TestbedError

    made = {}

    def fail(self):
        made.update(leftovers(prefix))  # the switch, namespaces, veths exist by now
        raise NatNodeError(f"NAT node {self.name}: simulated failure")

    prefix = netns.run_prefix("tu")
    monkeypatch.setattr(NatNode, "configure", fail)
    with pytest.raises(TestbedError, match="simulated failure"):
        Testbed.from_file(None, prefix=prefix).up()
    assert made["namespaces"] and made["processes"]
    assert _nothing_left(prefix) == {}


def test_down_finds_the_leftovers_of_a_killed_run():
    prefix = netns.run_prefix("tk")
    natmig = [sys.executable, "-m", "natmig.cli"]
    # Killed half way through up: some namespaces and daemons exist, the rest not.
    p = subprocess.Popen([*natmig, "testbed", "up", "--prefix", prefix], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not leftovers(prefix)["processes"] and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    try:
        assert leftovers(prefix)["namespaces"], "the killed run made nothing; the test proves nothing"
        # Killed after a complete up: a whole testbed nobody will tear down.
        subprocess.run([*natmig, "testbed", "up", "--prefix", prefix], check=True, capture_output=True)
        pids = leftovers(prefix)["processes"]
        assert len(pids) == 2
    finally:
        out = subprocess.run([*natmig, "testbed", "down", "--prefix", prefix], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _nothing_left(prefix) == {}
    assert not any(_alive(p) for p in pids)
    links = netns.run(["ip", "-o", "link", "show"]).stdout
    assert f"{prefix}-" not in links
