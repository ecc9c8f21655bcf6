"""Held, not dropped: new sessions attempted while admission is closed, on the testbed's Open vSwitch.

A NAT node with closed admission queues the packets that would create a
session (NFQUEUE) and, when admission opens, sends them back to the switch,
whose hairpin flows hand them to the NAT active at that instant.  Timing is
CLOCK_MONOTONIC, which the client's namespace shares with this process.
One testbed serves the module; every test opens admission on both nodes,
stops holding and points traffic back at nat1, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from natmig import netns
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.natnode import NatNode
from natmig.agent.nfqueue import HOLD_LIMIT
from natmig.testbed.bed import Testbed
from natmig.testbed.prefix import leftovers

pytestmark = pytest.mark.root

FLOWS = Path(__file__).with_name("flows_natnode.py")
SERVER = "203.0.113.100"
TCP_PORT, UDP_PORT = 5001, 5002
#: How long admission stays closed while a client tries to connect.
HOLD = 0.3
#: What a held connection may take after admission opened (a lost SYN costs a 1 s retransmit).
SLACK = 0.05

# Connects (timing it), sends one line, prints what the echo server saw as JSON.
_TCP_CLIENT = r"""
import json, socket, sys, time
sport = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport))
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
s.settimeout(5)
s.connect((sys.argv[2], int(sys.argv[3])))
t1 = time.monotonic()
s.sendall(b"1\n")
seen = s.makefile().readline().split()
print(json.dumps({"start": t0, "connected": t1, "public_port": int(seen[-1])}), flush=True)
"""

# Sends numbered datagrams from one port (count, a pause of interval s after every `every`);
# prints the numbers echoed back within `wait` s of the last answer.
_UDP_CLIENT = r"""
import json, socket, sys, time
sport, count, interval, wait = int(sys.argv[1]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
every = int(sys.argv[7]) if len(sys.argv) > 7 else 1
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
print("ready", flush=True)
sys.stdin.readline()
for i in range(1, count + 1):
    s.sendto(str(i).encode(), (sys.argv[2], int(sys.argv[3])))
    if interval and i % every == 0:
        time.sleep(interval)
got, ports = [], set()
s.settimeout(wait)
try:
    while True:
        seq, _ip, port = s.recv(100).decode().split()
        got.append(int(seq))
        ports.add(int(port))
except socket.timeout:
    pass
print(json.dumps({"answered": got, "ports": sorted(ports)}), flush=True)
"""


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with Testbed.from_file(None, prefix=netns.run_prefix("th")) as bed:
        procs: list[subprocess.Popen] = []
        try:
            for mode, port in (("tcp-server", TCP_PORT), ("udp-server", UDP_PORT)):
                p = subprocess.Popen(netns.ns_cmd([sys.executable, str(FLOWS), mode, str(port)], bed.netns("server")),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            yield bed
        finally:
            for p in procs:
                p.kill()
                p.wait()
    assert not any(leftovers(bed.prefix).values())


@contextmanager
def holding(tb: Testbed, limit: int = HOLD_LIMIT) -> Iterator[dict[str, NatNode]]:
    """Both NAT nodes held by this process (at most ``limit`` packets each); afterwards admission open, holders closed, traffic on nat1."""
    nodes = {nat: NatNode(tb.nat_config(nat), hold=True, hold_limit=limit) for nat in tb.topology.nats}
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.set_admission(True)
            node.close()
        tb.point_to("nat1")


class Client:
    """A client script in the client's namespace, started and ready, which begins when :meth:`go` is called."""

    def __init__(self, tb: Testbed, script: str, *args: object) -> None:
        self.p = subprocess.Popen(netns.ns_cmd([sys.executable, "-c", script, *map(str, args)], tb.netns("client")),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready", self.p.stderr.read()

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def result(self, timeout: float = 10) -> dict:
        out, err = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@contextmanager
def client(tb: Testbed, script: str, *args: object) -> Iterator[Client]:
    c = Client(tb, script, *args)
    try:
        yield c
    finally:
        c.kill()


def wait_held(node: NatNode, n: int, timeout: float = 2.0) -> int:
    """Wait until ``node`` holds at least ``n`` packets; how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = node.hold_stats()
        held = stats.held if stats else 0
        if held >= n or time.monotonic() > deadline:
            return held
        time.sleep(0.005)


def sessions_from(tb: Testbed, nat: str, sport: int, proto: str = "TCP") -> list:
    """The sessions of ``nat``'s table from the client's source port."""
    return [s for s in ConntrackProvider(tb.netns(nat), {tb.public_address}).list().sessions
            if s.protocol == proto and s.src_port == sport]


def test_a_connection_attempted_while_admission_is_closed_is_held_not_retransmitted(tb: Testbed) -> None:
    with holding(tb) as nodes, client(tb, _TCP_CLIENT, 41001, SERVER, TCP_PORT) as c:
        nat1 = nodes["nat1"]
        nat1.set_admission(False)
        c.go()
        time.sleep(HOLD)
        assert wait_held(nat1, 1) >= 1, "the SYN was not held"
        opened = time.monotonic()
        nat1.set_admission(True)
        r = c.result()
        released = nat1.hold_stats().released
    delay = r["connected"] - opened
    print(f"connected {1000 * (r['connected'] - r['start']):.1f} ms after the attempt, {1000 * delay:.1f} ms after admission opened")
    assert r["connected"] > opened, "connected while admission was closed"
    assert delay < SLACK, f"connected {delay * 1000:.0f} ms after admission opened: the SYN was lost, not held"
    assert 20000 <= r["public_port"] <= 29999
    assert released >= 1


def test_a_syn_retransmitted_during_a_long_hold_is_kept_once(tb: Testbed) -> None:
    # Closed for 3.5 s: the client sends its SYN again after 1 s and 3 s (the same attempt).
    with holding(tb) as nodes, client(tb, _TCP_CLIENT, 41006, SERVER, TCP_PORT) as c:
        nat1 = nodes["nat1"]
        nat1.set_admission(False)
        c.go()
        time.sleep(3.5)
        during = nat1.hold_stats()
        opened = time.monotonic()
        nat1.set_admission(True)
        r = c.result()
        after = nat1.hold_stats()
    print(f"while closed: {during}; connected {1000 * (r['connected'] - opened):.1f} ms after admission opened")
    assert during is not None and after is not None
    # One packet held for the attempt, its two retransmissions counted and not kept.
    assert during.held == 1 and during.repeated >= 2, during
    assert after.released - during.released == 1 and after.held == 0, after
    assert opened < r["connected"] < opened + SLACK, "not made on the release of the held SYN"
    assert 20000 <= r["public_port"] <= 29999


def test_a_udp_flow_started_while_admission_is_closed_loses_no_datagram(tb: Testbed) -> None:
    with holding(tb) as nodes, client(tb, _UDP_CLIENT, 41002, SERVER, UDP_PORT, 5, 0.02, 1.0) as c:
        nat1 = nodes["nat1"]
        nat1.set_admission(False)
        c.go()
        assert wait_held(nat1, 5) == 5
        time.sleep(HOLD - 0.1)
        nat1.set_admission(True)
        r = c.result()
    # The first datagram too, and in order: released as they arrived, and all of one mapping.
    assert r["answered"] == [1, 2, 3, 4, 5], r
    assert len(r["ports"]) == 1 and 20000 <= r["ports"][0] <= 29999, r


def test_a_packet_held_on_the_source_is_natted_by_the_target_after_the_switch(tb: Testbed) -> None:
    sport = 41003
    with holding(tb) as nodes, client(tb, _TCP_CLIENT, sport, SERVER, TCP_PORT) as c:
        nat1, nat2 = nodes["nat1"], nodes["nat2"]
        nat1.set_admission(False)
        c.go()
        assert wait_held(nat1, 1) >= 1, "the SYN was not held"
        tb.point_to("nat2")
        opened = time.monotonic()
        nat1.set_admission(True)
        r = c.result()
        on_nat2 = sessions_from(tb, "nat2", sport)
        on_nat1 = sessions_from(tb, "nat1", sport)
        stats = nat1.hold_stats(), nat2.hold_stats()
    assert r["connected"] - opened < SLACK, r
    # nat2 made the session with its own mapping, the one the server saw; nat1 never did.
    assert [s.translated_port for s in on_nat2] == [r["public_port"]], on_nat2
    assert on_nat1 == []
    assert stats[0].released >= 1 and stats[1] is None  # nat2's admission never closed: it never held


def queued_by_kernel(tb: Testbed, nat: str) -> int:
    """Packets the xtables rule has sent to the queue (its counter, read with nft: iptables-nft rules are nft rules)."""
    rules = netns.run(["nft", "list", "chain", "ip", "mangle", "PREROUTING"], tb.netns(nat)).stdout
    return sum(int(line.split("packets ")[1].split()[0]) for line in rules.splitlines() if "queue num" in line)


#: The bound the next test fills: the agent's (HOLD_LIMIT) would take two minutes of datagrams.
SMALL_LIMIT = 4096


def test_beyond_the_bound_packets_are_dropped_and_counted(tb: Testbed) -> None:
    # Twice the bound, in bursts of 64 (the userspace switch loses much of one long burst).
    sent = 2 * SMALL_LIMIT
    with holding(tb, SMALL_LIMIT) as nodes:
        nat1 = nodes["nat1"]
        before = queued_by_kernel(tb, "nat1")
        nat1.set_admission(False)
        with client(tb, _UDP_CLIENT, 41004, SERVER, UDP_PORT, sent, 0.001, 0.5, 64) as c:
            c.go()
            # Until the counters stop moving: every datagram that reached the node is held or counted.
            last, quiet = None, 0
            while quiet < 10:
                time.sleep(0.02)
                s = nat1.hold_stats()
                quiet = quiet + 1 if s == last else 0
                last = s
            assert last is not None
            assert last.held == SMALL_LIMIT, last
            # Nothing lost unseen: what the kernel queued was held or counted over the bound.
            assert last.held + last.over_limit == queued_by_kernel(tb, "nat1") - before > SMALL_LIMIT, last
            t0 = time.monotonic()
            nat1.set_admission(True)
            print(f"{last.held} held, {last.over_limit} over the limit; opened and released in {1000 * (time.monotonic() - t0):.1f} ms")
            c.result()
        after = nat1.hold_stats()
        assert after.held == 0 and after.released == SMALL_LIMIT and after.unsendable == 0, after
        # Still working: closed and opened again, a new connection is held and released.
        with client(tb, _TCP_CLIENT, 41005, SERVER, TCP_PORT) as c2:
            nat1.set_admission(False)
            c2.go()
            assert wait_held(nat1, 1) >= 1
            nat1.set_admission(True)
            assert 20000 <= c2.result()["public_port"] <= 29999


def test_admission_closed_by_another_process_drops_instead_of_sending_round(tb: Testbed) -> None:
    """A holder that released (and so passes packets on) must not send what another process's closed admission queues.

    Sent back to the switch, such a packet would come back to the same closed
    node and be queued again, round and round; after the release grace it is
    dropped and counted instead, as with nobody listening.
    """
    with holding(tb) as nodes, client(tb, _UDP_CLIENT, 41006, SERVER, UDP_PORT, 3, 0.02, 0.3) as c:
        nat1 = nodes["nat1"]
        nat1.set_admission(False)
        nat1.set_admission(True)
        time.sleep(0.3)  # past the grace (0.2 s)
        other = NatNode(tb.nat_config("nat1"), hold=False)
        other.set_admission(False)
        try:
            c.go()
            r = c.result()
            stats = nat1.hold_stats()
        finally:
            other.set_admission(True)
    assert r["answered"] == []
    assert stats.not_holding == 3 and stats.released == 0, stats


def test_an_agent_started_on_a_closed_node_holds_from_its_start(tb: Testbed, tmp_path: Path) -> None:
    """Admission left closed (an agent killed mid-move, no state directory): the next agent holds, not the kernel drops."""
    from natmig.controller.agentfleet import AgentFleet

    outsider = NatNode(tb.nat_config("nat1"), hold=False)
    outsider.set_admission(False)  # closed by a process that holds nothing: the kernel drops
    fleet = AgentFleet(tb, tmp_path / "agents")
    try:
        fleet.start("nat1")
        node = fleet.endpoint("nat1").open()
        try:
            assert node.get_admission() is False  # the agent found it closed and left it so
            with client(tb, _TCP_CLIENT, 41010, SERVER, TCP_PORT) as c:
                c.go()
                time.sleep(HOLD)
                opened = time.monotonic()
                node.set_admission(True)
                r = c.result()
        finally:
            node.close()
    finally:
        fleet.close()
        outsider.set_admission(True)
    delay = r["connected"] - opened
    assert r["connected"] > opened, "connected while admission was closed"
    assert delay < SLACK, f"connected {delay * 1000:.0f} ms after admission opened: the SYN was dropped, not held"
