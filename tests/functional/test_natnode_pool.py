"""A NAT node with a public address pool, against the real kernel: live traffic leaves on the pool's addresses."""

from __future__ import annotations

import json

import pytest

from natmig import netns
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.natnode import TABLE
from natmig.pool import PublicRange

from .helpers_natnode import PUBLIC_IP, SERVER_IP, TwoNatNet, built

pytestmark = pytest.mark.root

SECOND_IP = "203.0.113.2"
POOL = (PublicRange(PUBLIC_IP, (20000, 29999)), PublicRange(SECOND_IP, (40000, 44999)))
#: Inside sources: the pool is paired (one public address per inside host,
#: chosen by a hash seeded at random), so 16 of them leave on one address only
#: with a chance of 2 in 65,536.
SOURCES = [f"10.0.0.{20 + i}" for i in range(16)]

_CLIENT = r"""
import json, socket, sys
seen = {}
for i, src in enumerate(sys.argv[1].split(",")):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 41000 + i))
    s.settimeout(3)
    s.sendto(b"x", (sys.argv[2], 5002))
    _, addr, port = s.recvfrom(200)[0].decode().split()
    seen[src] = [addr, int(port)]
print(json.dumps(seen))
"""


@pytest.fixture
def net():
    """Client, server, switch and NAT node a with the two-address pool, always torn down."""
    with built("nmpl", ("a",), pool=POOL) as n:
        yield n


def test_a_two_address_pool_translates_live_traffic_to_pool_addresses(net: TwoNatNet) -> None:
    node = net.nats["a"]
    rules = netns.run(["nft", "list", "table", "ip", TABLE], node.name).stdout
    assert "jhash ip saddr mod 2 map" in rules, rules
    assert node.owned_addresses() == {PUBLIC_IP, SECOND_IP}
    for a in SOURCES:
        netns.run(["ip", "addr", "add", f"{a}/24", "dev", "eth0"], net.client)
    net.start_servers(5001, 5002)
    out = netns.run(["python3", "-c", _CLIENT, ",".join(SOURCES), SERVER_IP], net.client, timeout=60)
    seen = json.loads(out.stdout)
    # What the server saw: every datagram answered, from a pool address, in that address's ports.
    ranges = {e.address: e.ports for e in POOL}
    assert set(seen) == set(SOURCES)
    for src, (addr, port) in seen.items():
        assert addr in ranges and ranges[addr][0] <= port <= ranges[addr][1], (src, addr, port)
    assert {addr for addr, _ in seen.values()} == {PUBLIC_IP, SECOND_IP}, seen
    # The kernel's table says the same, and the provider owns both addresses.
    prov = ConntrackProvider(node.name, node=node)
    assert prov.public_addresses() == {PUBLIC_IP, SECOND_IP}
    udp = {s.src_address: (s.translated_address, s.translated_port) for s in prov.list().sessions if s.protocol == "UDP"}
    assert {src: tuple(v) for src, v in seen.items()} == {src: udp[src] for src in SOURCES}
