"""The OpenFlow graph of a testbed, computed without touching a switch.

Each data network is a hub (no learning state that could go stale when the
NAT changes): a frame from a host goes to the other hosts of its network and
to the active NAT node's leg on it (the *steering* flows); a frame from any
NAT node's leg goes to the hosts of that network (the *return* flows, the
same for every NAT node at all times, so packets still in flight through the
old node when traffic moves are delivered, not dropped).  The switch sends
nothing to an idle NAT node.  Moving traffic to another NAT node is
replacing this table with the one planned for that node in one OpenFlow
bundle (see :meth:`natmig.testbed.ovs.Ovs.replace_flows`); only the steering
flows differ, and both directions change in the same bundle.  Among them are
the *hairpin* flows (:func:`natmig.controller.plan.hairpin_flows`, the same
rules the controller installs): what a NAT node sends to the inside gateway
MAC, packets it held while its admission was closed, goes to the active
node's inside leg.
"""

from __future__ import annotations

import re

from ..controller.plan import hairpin_flows
from .topology import NETWORKS, Topology

#: Marks every flow natmig installs, so a dump shows whose flows they are.
COOKIE = 0x6E6D
_PRIORITY = 100


def port_names(topo: Topology) -> dict[str, int]:
    """Switch port name -> OpenFlow port number, fixed by the topology's order.

    Hosts get 1, 2, ...; NAT node ``i`` (from 0) gets ``100 + 2i`` for its
    inside leg ``<nat>-in`` and ``101 + 2i`` for its public leg ``<nat>-out``.
    Fixed numbers make flows readable and the same on every run.
    """
    ports = {h: i + 1 for i, h in enumerate(topo.hosts)}
    for i, nat in enumerate(topo.nats):
        ports[nat_port(nat, "inside")] = 100 + 2 * i
        ports[nat_port(nat, "public")] = 101 + 2 * i
    return ports


def nat_port(nat: str, network: str) -> str:
    """The switch port of ``nat``'s leg on ``network``."""
    return f"{nat}-{'in' if network == 'inside' else 'out'}"


def plan(topo: Topology, active: str) -> str:
    """The whole flow table (ovs-ofctl flow syntax, one flow a line) steering through ``active``."""
    if active not in topo.nats:
        raise ValueError(f"{active!r} is not a NAT node of topology {topo.name} (one of: {', '.join(topo.nats)})")
    ports = port_names(topo)
    lines = []
    for network in NETWORKS:
        hosts = [ports[h.name] for h in topo.hosts_on(network)]
        for p in hosts:
            out = ",".join(f"output:{q}" for q in [*hosts, ports[nat_port(active, network)]] if q != p)
            lines.append(f"cookie={COOKIE:#x},priority={_PRIORITY},in_port={p},actions={out}")
        for nat in topo.nats:
            out = ",".join(f"output:{q}" for q in hosts)
            lines.append(f"cookie={COOKIE:#x},priority={_PRIORITY},in_port={ports[nat_port(nat, network)]},actions={out}")
    inside = {nat: ports[nat_port(nat, "inside")] for nat in topo.nats}
    gateway_mac = topo.networks["inside"].gateway_mac
    lines += [f"cookie={COOKIE:#x},{f}" for f in hairpin_flows(inside, active, gateway_mac, _PRIORITY + 1)]
    # Explicit, although secure fail mode already drops on a miss: the dump
    # then says so, and what nothing matched is visibly counted.
    lines.append(f"cookie={COOKIE:#x},priority=0,actions=drop")
    return "\n".join(lines) + "\n"


def nats_in_flows(topo: Topology, flows: list[str]) -> set[str]:
    """The NAT nodes a dumped flow table sends traffic to (a port of theirs in an output action)."""
    by_number = {n: name for name, n in port_names(topo).items()}
    used = {int(m.group(1)) for line in flows for m in re.finditer(r"output:(\d+)", line)}
    nats = set()
    for number in used:
        port = by_number.get(number, "")
        for nat in topo.nats:
            if port in (nat_port(nat, "inside"), nat_port(nat, "public")):
                nats.add(nat)
    return nats
