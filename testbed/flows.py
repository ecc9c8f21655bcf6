"""The switch layout of a testbed: which OpenFlow port is which host or NAT leg.

The flows themselves are planned by :mod:`natmig.controller.plan`, the one
OpenFlow planner, from the :class:`~natmig.controller.plan.SwitchLayout`
this module derives from a topology.  Each data network is a hub (no
learning state that could go stale when the NAT changes): a frame from a
host goes to the other hosts of its network and to the active NAT node's
leg on it (the *steering* flows); a frame from any NAT node's leg goes to
the hosts of that network (the *return* flows, the same for every NAT node
at all times, so packets still in flight through the old node when traffic
moves are delivered, not dropped).  The switch sends nothing to an idle NAT
node.  Moving traffic to another NAT node is replacing the table with the
one planned for that node in one OpenFlow bundle (see
:meth:`natmig.testbed.ovs.Ovs.replace_flows`); only the steering flows
differ, and both directions change in the same bundle.  Among them are the
*hairpin* flows (:func:`natmig.controller.plan.hairpin_flows`, the same
rules the controller installs): what a NAT node sends to the inside gateway
MAC, packets it held while its admission was closed, goes to the active
node's inside leg.
"""

from __future__ import annotations

from ..controller.plan import NatPorts, SwitchLayout, flow_table
from ..controller.plan import nats_in_flows as _nats_in_flows
from .topology import Topology

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


def layout(topo: Topology) -> SwitchLayout:
    """The bridge as the planner sees it: host ports per network (a hub each), NAT legs, the shared gateway MAC, the cookie."""
    ports = port_names(topo)
    inside = [ports[h.name] for h in topo.hosts_on("inside")]
    public = [ports[h.name] for h in topo.hosts_on("public")]
    nats = {nat: NatPorts(ports[nat_port(nat, "inside")], ports[nat_port(nat, "public")]) for nat in topo.nats}
    return SwitchLayout(topo.bridge, inside[0], public[0], nats, _PRIORITY, topo.networks["inside"].gateway_mac,
                        tuple(inside[1:]), tuple(public[1:]), COOKIE)


def plan(topo: Topology, active: str) -> str:
    """The whole flow table (ovs-ofctl flow syntax, one flow a line) steering through ``active``."""
    if active not in topo.nats:
        raise ValueError(f"{active!r} is not a NAT node of topology {topo.name} (one of: {', '.join(topo.nats)})")
    return "".join(f"{line}\n" for line in flow_table(layout(topo), active))


def nats_in_flows(topo: Topology, flows: list[str]) -> set[str]:
    """The NAT nodes a dumped flow table sends traffic to (a port of theirs in an output action)."""
    return set(_nats_in_flows(layout(topo), flows))
