"""`natmig migrate` between two firewall agents (processes, one per firewall namespace), switch none (root).

The agents serve fw-state over their nodes' conntrack tables and blocked
sets (``natmig agent --provider firewall``), reached on their management
legs (192.0.2.1, 192.0.2.2) from the switch namespace, where the
controller runs (the inventory's netns).  Traffic through firewall a makes
its state: live TCP flows both ways, and an attacker that floods and is
blocked.  After the move, b's conntrack holds the sessions and its blocked
set the attacker with the remaining timeout it had on a; a holds neither.
Agents are stopped by pid and namespaces deleted, on failure too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from natmig import netns
from natmig.agent import nftables

from .helpers_fwnode import ATTACKER, CLIENT, MGMT, OUTSIDE, SERVICE, FwNet, built, exchange

pytestmark = pytest.mark.root

NATMIG = [sys.executable, "-m", "natmig.cli"]


def blocked(ns: str) -> dict[str, int]:
    s = nftables.run_json(ns, "list set ip natmig_fw blocked")["nftables"][1]["set"]
    return {e["elem"]["val"]: e["elem"]["expires"] for e in s.get("elem", [])}


def sessions(ns: str) -> set[tuple[str, ...]]:
    """The 5-tuples of the namespace's conntrack table, the host's own (management, 192.0.2.0/24) left out."""
    out = set()
    for line in netns.run(["conntrack", "-L"], ns).stdout.splitlines():
        words = line.split()
        first = {}
        for w in words:  # the original tuple's fields come first on the line
            k, _, v = w.partition("=")
            first.setdefault(k, v)
        if "sport" in first and not (first["src"] + first["dst"]).count("192.0.2."):
            out.add((words[0], first["src"], first["sport"], first["dst"], first["dport"]))
    return out


class Agents:
    def __init__(self, net: FwNet, tmp: Path, provider: str = "firewall") -> None:
        self.net, self.tmp = net, tmp
        self.procs: list[subprocess.Popen] = []
        subprocess.run([*NATMIG, "agent", "passwd", str(tmp / "passwords"), "natmig", "--password-stdin"], input=b"secret\n",
                       check=True, capture_output=True)
        (tmp / "secret").write_text("secret\n")
        known = []
        for name, node in net.nodes.items():
            ready = tmp / f"{name}.ready"
            self.procs.append(subprocess.Popen(
                [*NATMIG, "agent", "--provider", provider, "--netns", node.name, "--listen", f"{MGMT[name]}:830",
                 "--passwords", str(tmp / "passwords"), "--host-key", str(tmp / f"{name}.key"), "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb")))
            deadline = time.monotonic() + 20
            while not ready.exists():
                assert time.monotonic() < deadline and self.procs[-1].poll() is None, (tmp / f"{name}.log").read_text()
                time.sleep(0.05)
            pub = (tmp / f"{name}.key.pub").read_text().split()
            known.append(f"[{MGMT[name]}]:830 {pub[0]} {pub[1]}")
        (tmp / "known_hosts").write_text("\n".join(known) + "\n")
        agents = "".join(f'[agents.fw{n}]\nhost = "{MGMT[n]}"\npassword_file = "{tmp / "secret"}"\n'
                         f'known_hosts = "{tmp / "known_hosts"}"\nnetns = "{net.switch}"\n\n' for n in net.nodes)
        (tmp / "inventory.toml").write_text(f'switch = "none"\n\n{agents}[migration]\nsource = "fwa"\ntarget = "fwb"\n')

    def migrate(self) -> tuple[subprocess.CompletedProcess[str], dict]:
        out = self.tmp / "report.json"
        cp = subprocess.run([*NATMIG, "migrate", "-i", str(self.tmp / "inventory.toml"), "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
        return cp, json.loads(out.read_text())

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Agents]:
    with built("fwe", ("a", "b"), new_rate=10, new_burst=20, block_timeout=120) as net:
        ag = Agents(net, tmp_path)
        try:
            yield ag
        finally:
            ag.close()


def test_migrate_moves_sessions_and_the_blocked_source_with_its_remaining_timeout(agents: Agents) -> None:
    net = agents.net
    a, b = net.nodes["a"].name, net.nodes["b"].name
    net.tcp_server(net.outside, OUTSIDE, 8080)
    net.tcp_server(net.inside, SERVICE, 80)
    flows = [net.connect(net.inside, CLIENT, OUTSIDE, 8080) for _ in range(5)] + [net.connect(net.outside, OUTSIDE, SERVICE, 80) for _ in range(5)]
    assert all(exchange(f) for f in flows)
    net.udp_burst(net.outside, ATTACKER, SERVICE, 53, 60)
    time.sleep(2)  # the block has run a while: its remaining timeout is no longer the set's own
    moved = sessions(a)
    left_on_a = blocked(a)[ATTACKER]
    assert len(moved) >= 30 and left_on_a <= 118
    t0 = time.monotonic()
    cp, report = agents.migrate()
    took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stdout + cp.stderr
    print(cp.stdout)
    assert report["ok"] and report["modules"] == ["fw-state@2026-12-03"], report
    assert report["copied"]["fw-state:session"] == len(moved) and report["copied"]["fw-state:blocked"] == 1
    # b holds the sessions and the blocked source, its timeout carried (counting down from a's); a holds neither.
    assert sessions(b) == moved
    left_on_b = blocked(b)[ATTACKER]
    assert left_on_a - took - 2 <= left_on_b <= left_on_a
    assert sessions(a) == set() and blocked(a) == {}
    rb = report["readback"]
    assert rb["fwb"]["tables"]["fw-state:session"]["entries"] == len(moved) and rb["fwa"]["admission"] is True
    # And the traffic lives on b: every flow goes on, the attacker stays out.
    net.attach("b")
    for f in flows:
        f.settimeout(2.0)
    assert all(exchange(f) for f in flows)
    with pytest.raises(OSError):
        net.connect(net.outside, ATTACKER, SERVICE, 80, timeout=1.0)


def test_a_subscriber_hears_the_firewalls_sessions_and_blocks_as_state_change(agents: Agents) -> None:
    from lxml import etree

    from natmig.controller.netconf import NodeClient

    net = agents.net

    def connect() -> NodeClient:
        return NodeClient.connect(MGMT["a"], 830, "natmig", password="secret", known_hosts=str(agents.tmp / "known_hosts"), timeout=10)

    client = netns.call_in(net.switch, connect)
    try:
        mgr = client._mgr
        mgr.create_subscription()
        net.tcp_server(net.outside, OUTSIDE, 8080)
        c = net.connect(net.inside, CLIENT, OUTSIDE, 8080)
        assert exchange(c)
        net.udp_burst(net.outside, ATTACKER, SERVICE, 53, 40)
        seen: list[tuple[str, str, dict[str, str]]] = []
        deadline = time.monotonic() + 5
        want = {("fw-state:session", "created", ("TCP", CLIENT, str(c.getsockname()[1]), OUTSIDE, "8080")),
                ("fw-state:blocked", "created", (ATTACKER,))}
        got: set = set()
        while time.monotonic() < deadline and not want <= got:
            n = mgr.take_notification(block=True, timeout=1.0)
            if n is None:
                continue
            root = n.notification_ele
            change = next(e for e in root.iter() if etree.QName(e).localname == "state-change")
            f = {etree.QName(e).localname: (e.text or "").strip() for e in change.iter() if isinstance(e.tag, str)}
            seen.append((f.get("table", ""), f.get("event", ""), f))
            key = ((f["protocol"], f["src-address"], f["src-port"], f["dst-address"], f["dst-port"]) if f.get("table") == "fw-state:session"
                   else (f.get("address"),))
            got.add((f["table"], f["event"], key))
        assert want <= got, seen
        # The agent's own management session (this very NETCONF connection) was never reported.
        assert not any("192.0.2." in " ".join(s[2].values()) for s in seen)
    finally:
        client.close()
