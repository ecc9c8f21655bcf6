"""A chained node (firewall then NAT, one conntrack table) moved by `natmig migrate` (root).

Each firewall node of the test network also translates its inside network
(:class:`natmig.agent.chainnode.ChainNode`), and its agent serves fw-state
and nat-session over one provider (``--provider chain``).  Outbound flows
are translated: their one kernel entry is a firewall session and a NAT
session.  Inbound flows to a service are firewall sessions only.  The move
must write each of a's kernel entries into b once (the kernel's own events
on b say so), with its translation, both modules' digests verified, and
never copy the host's own connections (the agent's management SSH).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from natmig import netns
from natmig.agent.chainnode import ChainNode, nat_config

from .helpers_fwnode import ATTACKER, CLIENT, CONTROLLER, MGMT, OUTSIDE, SERVICE, built, exchange
from .test_fw_migrate import Agents, blocked

pytestmark = pytest.mark.root

PUBLIC = "203.0.113.1"


def table(ns: str) -> dict[tuple[str, ...], tuple[str, str]]:
    """The namespace's conntrack entries: original 5-tuple -> the reply's destination (address, port): the translation."""
    out = {}
    for line in netns.run(["conntrack", "-L"], ns).stdout.splitlines():
        words = line.split()
        seen: dict[str, list[str]] = {}
        for w in words:
            k, _, v = w.partition("=")
            seen.setdefault(k, []).append(v)
        if "sport" in seen:
            out[(words[0], seen["src"][0], seen["sport"][0], seen["dst"][0], seen["dport"][0])] = (seen["dst"][1], seen["dport"][1])
    return out


def own(key: tuple[str, ...]) -> bool:
    """A connection of the host's own: to or from the management network."""
    return key[1].startswith("192.0.2.") or key[3].startswith("192.0.2.")


@pytest.fixture
def chained(tmp_path: Path) -> Iterator[Agents]:
    with built("fwc", ("a", "b"), new_rate=10, new_burst=20, block_timeout=120) as net:
        for node in net.nodes.values():
            ChainNode(node.cfg, nat_config(node.cfg, PUBLIC)).configure()
        ag = Agents(net, tmp_path, provider="chain")
        try:
            yield ag
        finally:
            ag.close()


def test_one_migration_moves_both_modules_writing_each_kernel_entry_once(chained: Agents) -> None:
    net = chained.net
    a, b = net.nodes["a"].name, net.nodes["b"].name
    net.tcp_server(net.outside, OUTSIDE, 8080)
    net.tcp_server(net.inside, SERVICE, 80)
    outbound = [net.connect(net.inside, CLIENT, OUTSIDE, 8080) for _ in range(5)]
    inbound = [net.connect(net.outside, OUTSIDE, SERVICE, 80) for _ in range(5)]
    assert all(exchange(f) for f in outbound + inbound)
    net.udp_burst(net.outside, ATTACKER, SERVICE, 53, 60)
    # The host's own connection in the same table: one to a's agent (SSH), open through the move.
    net.connect(net.switch, CONTROLLER, MGMT["a"], 830)
    time.sleep(1.5)
    before = table(a)
    moved = {k: v for k, v in before.items() if not own(k)}
    translated = {k: v for k, v in moved.items() if v != (k[1], k[2])}
    # Outbound flows are translated to the public address; inbound ones and the attacker's are not.
    assert {v[0] for v in translated.values()} == {PUBLIC} and len(translated) >= 5
    assert len(moved) - len(translated) >= 5
    left_on_a = blocked(a)[ATTACKER]
    # Everything b's kernel reports while the state moves in.
    events = subprocess.Popen(["ip", "netns", "exec", b, "conntrack", "-E", "-e", "NEW,UPDATE,DESTROY"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.3)
        cp, report = chained.migrate()
        time.sleep(0.3)
    finally:
        events.send_signal(signal.SIGTERM)
        out, _ = events.communicate(timeout=10)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    print(cp.stdout)
    assert report["ok"] and sorted(report["modules"]) == ["fw-state@2026-12-03", "nat-session@2026-12-03"], report
    assert report["copied"]["fw-state:session"] == len(moved)
    assert report["copied"]["nat-session:nat-session"] == len(translated)
    assert "source digests match the copy" in next(p["detail"] for p in report["phases"] if p["name"] == "verify")
    # b holds each of a's entries with its translation, a none of them.
    after = table(b)
    assert {k: v for k, v in after.items() if not own(k)} == moved
    assert not [k for k in table(a) if not own(k)]
    # The host's own connections: the one to a's agent was in a's table and never reached b's, nor left a's.
    assert any(k[3] == MGMT["a"] for k in before) and any(k[3] == MGMT["a"] and k[1] == CONTROLLER for k in table(a))
    assert not any(MGMT["a"] in (k[1], k[3]) for k in after)
    # Each moved entry was written into b once: one NEW each, no UPDATE, nothing destroyed.
    writes: dict[tuple[str, ...], list[str]] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) < 3:
            continue
        fields = {}
        for w in words:
            k, _, v = w.partition("=")
            fields.setdefault(k, v)
        if "sport" in fields:
            key = (words[1], fields["src"], fields["sport"], fields["dst"], fields["dport"])
            if not own(key):
                writes.setdefault(key, []).append(words[0])
    assert set(writes) == set(moved), (set(moved) ^ set(writes))
    assert all(kinds == ["[NEW]"] for kinds in writes.values()), {k: v for k, v in writes.items() if v != ["[NEW]"]}
    # The blocked source came along, its time counting down.
    assert blocked(b)[ATTACKER] <= left_on_a
    # Traffic on b: every flow goes on (the translated ones through the same public port, or nothing would come back).
    net.attach("b")
    for f in outbound + inbound:
        f.settimeout(2.0)
    assert all(exchange(f) for f in outbound + inbound)
    with pytest.raises(OSError):
        net.connect(net.outside, ATTACKER, SERVICE, 80, timeout=1.0)


def test_the_provider_writes_one_entry_per_key_and_refuses_half_a_connection(tmp_path: Path) -> None:
    from natmig.agent.chainprovider import ChainProvider
    from natmig.agent.fwnode import FwNode
    from natmig.agent.stateprovider import Change, StateRefused
    from natmig.schema import YANG_DIR
    from natmig.statemodel import load_module

    fw_mod, nat_mod = load_module(YANG_DIR / "fw-state.yang"), load_module(YANG_DIR / "nat-session.yang")
    session, nat = fw_mod.list("session"), nat_mod.list("nat-session")
    with built("fwq", ("a", "b")) as net:
        providers = []
        for node in net.nodes.values():
            ChainNode(node.cfg, nat_config(node.cfg, PUBLIC)).configure()
            providers.append(ChainProvider(fw_mod, nat_mod, FwNode(node.cfg, hold=False)))
            net.sockets.append(providers[-1])  # type: ignore[arg-type]  # closed with the network, on failure too
        pa, pb = providers
        net.tcp_server(net.outside, OUTSIDE, 8080)
        c = net.connect(net.inside, CLIENT, OUTSIDE, 8080)
        assert exchange(c)
        got = pa.read()
        key = ("TCP", CLIENT, c.getsockname()[1], OUTSIDE, 8080)
        # One kernel entry, two lists: the firewall's session and the NAT's, with its translation.
        assert key in got[session] and key in got[nat] and got[nat][key][5] == PUBLIC
        assert len(got[nat]) == 1
        fw_entry, nat_entry = got[session][key], got[nat][key]
        b = net.nodes["b"].name
        ck = ("tcp", CLIENT, str(key[2]), OUTSIDE, "8080")  # as conntrack -L shows it
        # Half a translated connection is refused, nothing written.
        with pytest.raises(StateRefused, match="carries no fw-state session"):
            pb.apply({nat: Change([nat_entry])})
        assert table(b) == {} or all(own(k) for k in table(b))
        # Both: one entry, the NAT's translation, the firewall's lifetime where the two differ.
        short = fw_entry[:6] + (200,) + fw_entry[7:]
        pb.apply({session: Change([short]), nat: Change([nat_entry[:8] + (900,) + nat_entry[9:]])})
        assert table(b)[ck] == (PUBLIC, str(nat_entry[6]))
        line = next(l for l in netns.run(["conntrack", "-L", "-p", "tcp", "--sport", str(key[2])], b).stdout.splitlines())
        assert int(line.split()[2]) <= 200
        # Deleting one view of a translated entry is refused; both go together.
        with pytest.raises(StateRefused, match="delete both or neither"):
            pb.apply({session: Change(deletes=[key])})
        assert ck in table(b)
        pb.apply({session: Change(deletes=[key]), nat: Change(deletes=[key])})
        assert ck not in table(b)
