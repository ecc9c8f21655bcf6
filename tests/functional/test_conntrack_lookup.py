"""ConntrackProvider.lookup (one ctnetlink GET per key) against list() on the same real table.

Real namespaces, real flows through NAT node a (TCP, UDP, ping) plus
injected sessions of every kind and untranslated entries; every key that
list() shows must come back from lookup() as the same NatSession, and keys
that list() does not show must find nothing.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from natmig import netns
from natmig.agent.conntrack import ConntrackProvider
from natmig.errors import ProviderError
from natmig.model import NatSession

from .helpers_natnode import CLIENT_IP, PUBLIC_IP, SERVER_IP, TwoNatNet, built, finish, wait_replies
from .test_conntrack_provider import TCP_PORT, TCP_SPORT, UDP_PORT, UDP_SPORT, synthetic

pytestmark = pytest.mark.root


@pytest.fixture
def net():
    """Client, server, switch and NAT node a only, always torn down."""
    with built("nmlk", ("a",)) as n:
        yield n


def same_but_timeout(got: list[NatSession], want: list[NatSession]) -> None:
    """Equal field by field; the remaining timeout may have ticked down a little in between."""
    g, w = {s.key: s for s in got}, {s.key: s for s in want}
    assert set(g) == set(w), (set(g) ^ set(w))
    for k, s in w.items():
        assert dataclasses.replace(g[k], timeout=None) == dataclasses.replace(s, timeout=None), k
        assert s.timeout - 2 <= g[k].timeout <= s.timeout + 2, (k, g[k].timeout, s.timeout)


def test_lookup_returns_exactly_what_list_shows_for_each_key(net: TwoNatNet) -> None:
    node = net.nats["a"]
    a = ConntrackProvider(node.name, node=node)
    try:
        net.start_servers(TCP_PORT, UDP_PORT)
        tcp = net.start("tcp-client", net.client, SERVER_IP, TCP_PORT, TCP_SPORT, 1.5, 0.02)
        udp = net.start("udp-client", net.client, SERVER_IP, UDP_PORT, UDP_SPORT, 1.5, 0.02)
        netns.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", SERVER_IP], net.client)  # a real ICMP echo session
        netns.run(["ping", "-c", "1", "-W", "1", "10.0.0.1"], net.client)  # untranslated: the NAT's own address
        wait_replies(tcp, 0.5)
        # Injected: TCP in several states, UDP, ICMP (via netlink), assured or not, marks.
        injected = synthetic(60, start_port=22000)
        a.apply(injected)
        # Untranslated entries: a UDP flow, and a TCP connection inbound to the public address.
        netns.run(["conntrack", "-I", "-p", "udp", "-s", CLIENT_IP, "-d", SERVER_IP, "--sport", "7000", "--dport", "53",
                   "-t", "100", "-u", "SEEN_REPLY"], node.name)
        netns.run(["conntrack", "-I", "-p", "tcp", "-s", "198.51.100.7", "-d", PUBLIC_IP, "--sport", "80", "--dport", "20999",
                   "-t", "100", "--state", "ESTABLISHED"], node.name)
        snap = a.list()
        assert snap.untranslated >= 3
        kinds = {(s.protocol, s.src_address == CLIENT_IP) for s in snap.sessions}
        assert {("TCP", True), ("UDP", True), ("ICMP", True), ("TCP", False), ("UDP", False), ("ICMP", False)} <= kinds, kinds
        assert len(snap.sessions) >= 63

        got = a.lookup([s.key for s in snap.sessions])
        same_but_timeout(got, snap.sessions)
        assert [s.key for s in got] == [s.key for s in snap.sessions]  # in the order asked

        # One key at a time, from several threads over the one socket.
        by_one: list[NatSession] = []
        errors: list[BaseException] = []

        def worker(part: list[NatSession]) -> None:
            try:
                for s in part:
                    by_one.extend(a.lookup([s.key]))
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(snap.sessions[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        same_but_timeout(by_one, snap.sessions)

        # Keys list() does not show find nothing.
        absent = [
            ("UDP", CLIENT_IP, 7000, SERVER_IP, 53),              # untranslated flow
            ("ICMP", CLIENT_IP, 1, "10.0.0.1", 0),                # untranslated ping (some identifier)
            ("TCP", "198.51.100.7", 80, PUBLIC_IP, 20999),        # untranslated, inbound
            ("UDP", "10.0.0.99", 1, SERVER_IP, 1),                # no such entry
            ("TCP", "fe80::1", 1, SERVER_IP, 1),                  # not an address this node can hold
            ("ICMP", CLIENT_IP, 5, SERVER_IP, 7),                 # ICMP with a dst_port
        ]
        # A key equal to a session's reply tuple: the kernel finds that session, which is not this key.
        s0 = injected[0]
        absent.append((s0.protocol, s0.dst_address, s0.dst_port, s0.translated_address, s0.translated_port))
        assert a.lookup(absent) == []
        assert a.lookup([]) == []
        # Duplicates asked once; mixed with absent keys.
        mixed = a.lookup([absent[3], s0.key, s0.key, absent[0]])
        assert [s.key for s in mixed] == [s0.key]
        with pytest.raises(ProviderError, match="not a key"):
            a.lookup([("UDP", CLIENT_IP)])  # type: ignore[list-item]

        # After a delete the key is gone; the socket kept open sees the change.
        a.delete([s0.key])
        assert a.lookup([s0.key]) == []
        a.close()
        assert [s.key for s in a.lookup([injected[1].key])] == [injected[1].key]  # reopened
        finish(tcp), finish(udp)
    finally:
        a.close()
