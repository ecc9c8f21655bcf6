"""The firewall node in real namespaces: what its ruleset lets through and what it drops (root).

One firewall between an inside host (client 10.0.0.2, service 10.0.0.10)
and an outside host (203.0.113.2, and the attacker 198.51.100.7); see
helpers_fwnode.py.  Teardown leaves no namespace, on failure too.
"""

from __future__ import annotations

import socket
import time

import pytest

from natmig import netns
from natmig.agent import nftables

from .helpers_fwnode import ATTACKER, CLIENT, OUTSIDE, SERVICE, built, exchange

pytestmark = pytest.mark.root


def counter(ns: str, rule: str) -> int:
    """The packets counted by the forward rule holding ``rule``."""
    for r in nftables.run_json(ns, "list chain ip natmig_fw forward")["nftables"]:
        if "rule" in r and rule in str(r["rule"]["expr"]):
            return next(x["counter"]["packets"] for x in r["rule"]["expr"] if "counter" in x)
    raise AssertionError(f"no rule with {rule}")


def test_established_flows_pass_and_new_ones_only_outbound_or_to_a_service() -> None:
    with built("fwn") as net:
        net.tcp_server(net.inside, SERVICE, 80)
        net.tcp_server(net.inside, SERVICE, 22)
        net.tcp_server(net.outside, OUTSIDE, 8080)
        out = net.connect(net.inside, CLIENT, OUTSIDE, 8080)
        inb = net.connect(net.outside, OUTSIDE, SERVICE, 80)
        for _ in range(20):  # an established flow keeps flowing both ways
            assert exchange(out) and exchange(inb)
            time.sleep(0.02)
        with pytest.raises(OSError):  # not a declared service: dropped, the connect times out
            net.connect(net.outside, OUTSIDE, SERVICE, 22, timeout=1.0)
        fw = net.nodes["a"].name
        ct = netns.run(["conntrack", "-L"], fw).stdout
        assert "dport=8080" in ct and "dport=80 " in ct and "dport=22 " not in ct


def test_a_midstream_packet_without_state_is_invalid_and_dropped() -> None:
    with built("fwm") as net:
        fw = net.nodes["a"].name
        net.tcp_server(net.outside, OUTSIDE, 8080)
        c = net.connect(net.inside, CLIENT, OUTSIDE, 8080)
        assert exchange(c)
        before = counter(fw, "invalid")
        netns.run(["conntrack", "-D", "-p", "tcp", "-s", CLIENT, "--dport", "8080"], fw)
        c.settimeout(1.5)
        assert not exchange(c)  # tcp_loose=0: the next segment is not picked up mid-stream
        assert counter(fw, "invalid") > before
        assert "dport=8080" not in netns.run(["conntrack", "-L"], fw).stdout  # and no state was made of it


def test_a_flooding_source_lands_in_blocked_with_a_timeout_and_is_dropped() -> None:
    with built("fwf", new_rate=10, new_burst=20, block_timeout=45) as net:
        fw = net.nodes["a"].name
        net.tcp_server(net.inside, SERVICE, 80)
        net.udp_burst(net.outside, ATTACKER, SERVICE, 53, 100)
        got = nftables.run_json(fw, "list set ip natmig_fw blocked")["nftables"][1]["set"]
        elems = got["elem"]
        assert [e["elem"]["val"] for e in elems] == [ATTACKER]  # the one flooding source, not the other outside host
        assert got["timeout"] == 45 and 40 <= elems[0]["elem"]["expires"] <= 45  # the set's timeout, counting down
        # Blocked: even a declared service is out of its reach now; the other host still reaches it.
        with pytest.raises(OSError):
            net.connect(net.outside, ATTACKER, SERVICE, 80, timeout=1.0)
        ok = net.connect(net.outside, OUTSIDE, SERVICE, 80)
        assert exchange(ok)
        assert counter(fw, "blocked") > 0
