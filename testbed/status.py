"""What of a testbed exists now, read back: nodes with their namespaces and addresses, switch ports and counters, daemons, the active NAT."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import netns
from ..errors import NatmigError, TestbedError
from .prefix import read_json

if TYPE_CHECKING:  # read through the testbed's own names; bed imports this module
    from .bed import Testbed


def read_status(tb: Testbed) -> dict[str, Any]:
    """What exists now: nodes with namespaces and addresses, switch ports, daemons, the active NAT."""
    state = read_json(tb.home / "state.json") or {}
    existing = set(netns.list_netns(f"{tb.prefix}-"))
    nodes: dict[str, Any] = {}
    for name in (*tb.topology.hosts, *tb.topology.nats):
        ns = tb.netns(name)
        kind = "host" if name in tb.topology.hosts else "nat"
        nodes[name] = {"kind": kind, "netns": ns, "exists": ns in existing, "addresses": _addresses(ns) if ns in existing else {}}
        if kind == "nat":
            nodes[name]["mgmt_address"] = tb.mgmt_address(name)
    switches: dict[str, Any] = {}
    active = None
    for m, ovs in tb.switches.items():
        pids = ovs.pids()
        ports: dict[str, Any] = {}
        if len(pids) == 2:
            try:
                counters = {n: c for n, c in ovs.port_stats(tb.bridge).items()}
                ofports = ovs.ofports(tb.bridge)
                ports = {name: {"ofport": ofports.get(name), **(vars(counters[n]) if n in counters else {})} for name, n in tb.switch_ports(m).items()}
            except TestbedError as e:
                ports = {"error": str(e)}
        ns = ovs.netns or ""
        switches[m] = {"netns": ns, "exists": ns in existing, "bridge": tb.bridge, "rundir": str(ovs.rundir), "daemons": pids, "ports": ports}
        if m:
            switches[m]["underlay"] = str(tb.topology.machines[m].underlay)
            switches[m]["nodes"] = tb.topology.on_machine(m)
    if all(len(ovs.pids()) == 2 for ovs in tb.switches.values()):
        try:
            if len(tb.topology.pairs()) > 1:
                active = ", ".join(n or "none" for n in tb.steering().actives().values())
            else:
                active = tb.active_nat()
        except NatmigError as e:
            active = f"unknown ({e})"
    multi = tb.topology.multi_machine
    return {
        "prefix": tb.prefix,
        "topology": tb.topology.source,
        "phase": state.get("phase", "down"),
        "healthy": tb.healthy(),
        "active_nat": active,
        "public_address": tb.public_address,
        "nodes": nodes,
        **({"machines": switches, "underlay": {"netns": tb.underlay_netns, "exists": tb.underlay_netns in existing,
                                               "subnet": str(tb.topology.underlay.subnet) if tb.topology.underlay else None,
                                               "tunnel": tb.topology.underlay.tunnel if tb.topology.underlay else None}}
           if multi else {"switch": switches[""]}),
        "management": {"netns": tb.mgmt_netns, "exists": tb.mgmt_netns in existing, "subnet": str(tb.topology.management.subnet), "controller": tb.controller_address},
    }

def _addresses(ns: str) -> dict[str, list[str]]:
    out = netns.run(["ip", "-o", "-4", "addr", "show"], ns, check=False).stdout
    addrs: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] != "lo":
            addrs.setdefault(parts[1], []).append(parts[3])
    return addrs
