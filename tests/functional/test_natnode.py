"""The NAT node data plane against the real kernel: translation, admission control, teardown."""

from __future__ import annotations

import pytest

from natmig import netns
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.natnode import TABLE, NatNode, NatNodeConfig, NatNodeError
from natmig.model import NatSession

from .helpers_natnode import CLIENT_IP, PUBLIC_IP, SERVER_IP, TwoNatNet, built, finish, replies_after, wait_replies

pytestmark = pytest.mark.root


@pytest.fixture
def net():
    """Client, server, switch and NAT node a, always torn down."""
    with built("nmnn", ("a",)) as n:
        yield n


def sysctl(ns: str, key: str) -> int:
    """A sysctl's value in a namespace."""
    return int(netns.run(["sysctl", "-n", key], ns).stdout)


def test_configure_sets_forwarding_liberal_tcp_and_the_ruleset(net: TwoNatNet) -> None:
    ns = net.nats["a"].name
    assert sysctl(ns, "net.ipv4.ip_forward") == 1
    assert sysctl(ns, "net.netfilter.nf_conntrack_tcp_be_liberal") == 1
    assert sysctl(ns, "net.ipv6.conf.all.disable_ipv6") == 1
    rules = netns.run(["nft", "list", "table", "ip", TABLE], ns).stdout
    assert "snat to 203.0.113.1:20000-29999" in rules and "icmp" in rules
    link = netns.run(["ip", "-o", "link", "show", "inside0"], ns).stdout
    assert "02:4e:4d:00:00:01" in link
    # configure() is idempotent: a second run replaces the table, not adds one.
    net.nats["a"].configure()
    assert netns.run(["nft", "list", "table", "ip", TABLE], ns).stdout.count("snat to") == 2


def test_tcp_udp_and_icmp_are_translated_to_the_public_address_and_range(net: TwoNatNet) -> None:
    net.start_servers(5001, 5002)
    t = finish(net.start("tcp-client", net.client, SERVER_IP, 5001, 40001, 0.3, 0.05))
    u = finish(net.start("udp-client", net.client, SERVER_IP, 5002, 40002, 0.3, 0.05))
    assert t["error"] is None and len(t["ports"]) == 1 and 20000 <= t["ports"][0] <= 29999, t
    assert len(u["ports"]) == 1 and 20000 <= u["ports"][0] <= 29999, u
    netns.run(["ping", "-c", "1", "-W", "2", "-p", "ab", SERVER_IP], net.client)
    icmp = [s for s in ConntrackProvider(net.nats["a"].name, {PUBLIC_IP}).list().sessions if s.protocol == "ICMP"]
    assert len(icmp) == 1 and icmp[0].translated_address == PUBLIC_IP and 20000 <= icmp[0].translated_port <= 29999


def test_admission_off_drops_new_sessions_but_not_existing_or_injected_ones(net: TwoNatNet) -> None:
    node = net.nats["a"]
    prov = ConntrackProvider(node.name, node=node)
    net.start_servers(5001, 5002)
    live = net.start("tcp-client", net.client, SERVER_IP, 5001, 40001, 2.0, 0.02)
    wait_replies(live, 0.5)
    # A UDP session injected before any of its packets was seen.
    prov.apply([NatSession("UDP", CLIENT_IP, 40003, SERVER_IP, 5002, PUBLIC_IP, 28000, None, 60)])
    node.set_admission(False)
    assert node.admission() is False
    try:
        injected = finish(net.start("udp-client", net.client, SERVER_IP, 5002, 40003, 0.3, 0.05))
        new_udp = finish(net.start("udp-client", net.client, SERVER_IP, 5002, 40004, 0.3, 0.05))
        new_tcp = netns.run(
            ["python3", "-c", f"import socket; socket.create_connection(('{SERVER_IP}', 5001), timeout=1)"],
            net.client, check=False,
        )
    finally:
        node.set_admission(True)
    t = finish(live)
    assert t["error"] is None and replies_after(t, 0) >= 20, t
    assert injected["ports"] == [28000], injected
    assert new_udp["replies"] == [], new_udp
    assert new_tcp.returncode != 0 and "timed out" in new_tcp.stderr
    assert node.admission() is True
    again = finish(net.start("udp-client", net.client, SERVER_IP, 5002, 40005, 0.3, 0.05))
    assert again["replies"], again


def test_admission_off_silences_unknown_packets_from_outside(net: TwoNatNet) -> None:
    """A reply for a session whose state has not arrived yet must be dropped, not answered.

    Open: the node's own stack refuses a connection to an unknown public port
    (a reset, "refused").  Closed: the packet is dropped, so the peer times
    out and retransmits instead of tearing the connection down.
    """
    node = net.nats["a"]
    probe = ["python3", "-c", f"import socket; socket.create_connection(('{PUBLIC_IP}', 24999), timeout=1)"]
    opened = netns.run(probe, net.server, check=False)
    assert opened.returncode != 0 and "refused" in opened.stderr, opened.stderr
    node.set_admission(False)
    try:
        closed = netns.run(probe, net.server, check=False)
    finally:
        node.set_admission(True)
    assert closed.returncode != 0 and "timed out" in closed.stderr, closed.stderr


def test_configure_refuses_a_missing_interface_and_destroy_cleans_up() -> None:
    cfg = NatNodeConfig(name=netns.run_prefix("nmnx") + "nat", inside_if="nope0", outside_if="nope1")
    node = NatNode(cfg)
    try:
        node.create()
        with pytest.raises(NatNodeError, match="inside_if 'nope0'"):
            node.configure()
    finally:
        node.destroy()
    assert not netns.exists(cfg.name)
    node.destroy()  # idempotent
    with pytest.raises(NatNodeError, match="does not exist"):
        node.configure()


def test_public_address_other_than_the_outside_address_is_owned() -> None:
    ns = netns.run_prefix("nmnp") + "nat"
    cfg = NatNodeConfig(name=ns, inside_if="i0", outside_if="o0", outside_address="198.51.100.1/24", public_address="203.0.113.9")
    node = NatNode(cfg)
    try:
        node.create()
        netns.add_veth("i0", "o0", ns, ns)
        node.configure()
        assert node.owned_addresses() == {"198.51.100.1", "203.0.113.9"}
    finally:
        node.destroy()
    assert not netns.exists(ns)


_IN_NODE = r"""
import json, subprocess, sys
from natmig.agent import nftables
from natmig.agent.natnode import NatNode, NatNodeConfig, NatNodeError
cfg = NatNodeConfig(**json.loads(sys.argv[1]))
node = NatNode(cfg)
assert nftables.in_process(cfg.name) is not None, "not inside the node"
def no_tool(*a, **k):
    raise AssertionError(f"a process was started: {a}")
subprocess.Popen = no_tool  # the in-process path must start no nft
seen = []
for admit in (False, True, False):
    node.set_admission(admit)
    seen.append(node.admission())
try:
    node._nft("add rule ip natmig no_such_chain drop\n")
except NatNodeError as e:
    seen.append(str(e))
print(json.dumps(seen))
"""


def test_the_agent_side_runs_nft_in_its_own_process(net: TwoNatNet) -> None:
    """A process living in the node's namespace (as an agent does) changes admission without starting nft."""
    import json
    import sys
    cfg = net.nats["a"].cfg
    args = {"name": cfg.name, "inside_if": cfg.inside_if, "outside_if": cfg.outside_if, "public_address": cfg.public_address}
    out = netns.run([sys.executable, "-c", _IN_NODE, json.dumps(args)], cfg.name).stdout
    seen = json.loads(out)
    assert seen[:3] == [False, True, False]
    assert "no_such_chain" in seen[3] and "No such file or directory" in seen[3], seen[3]
    # The tool, from outside, sees what the process left: admission closed.
    assert "meta mark set" in netns.run(["nft", "list", "chain", "ip", TABLE, "admission"], cfg.name).stdout
    assert NatNode(cfg).admission() is False
