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

With machines declared (docs/multihost.md) each machine has its own switch
holding its local hosts and NAT legs (the same port numbers as on one
switch) and four tunnel ports to each other machine; their flows are
planned by :mod:`natmig.controller.fabric`, which also plans one switch
holding several NAT instances (a machine named "", without tunnels).
"""

from __future__ import annotations

from ..controller.fabric import DIRECTIONS, Fabric, MachinePorts, machine_table, tunnel_code
from ..controller.plan import NatPorts, SwitchLayout, flow_table
from ..controller.plan import nats_in_flows as _nats_in_flows
from .topomodel import Topology

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
    """The bridge as the planner sees it: host ports per network (a hub each), NAT legs, the shared gateway MAC, the cookie.

    One switch steers one pair of networks (the topology refuses more without machines).
    """
    ports = port_names(topo)
    inside_net, public_net = topo.nats[topo.active_nat].pair
    inside = [ports[h.name] for h in topo.hosts_on(inside_net)]
    public = [ports[h.name] for h in topo.hosts_on(public_net)]
    nats = {nat: NatPorts(ports[nat_port(nat, "inside")], ports[nat_port(nat, "public")]) for nat in topo.nats}
    return SwitchLayout(topo.bridge, inside[0], public[0], nats, _PRIORITY, topo.networks[inside_net].gateway_mac,
                        tuple(inside[1:]), tuple(public[1:]), COOKIE)


def plan(topo: Topology, active: str) -> str:
    """The whole flow table (ovs-ofctl flow syntax, one flow a line) steering through ``active``."""
    if active not in topo.nats:
        raise ValueError(f"{active!r} is not a NAT node of topology {topo.name} (one of: {', '.join(topo.nats)})")
    return "".join(f"{line}\n" for line in flow_table(layout(topo), active))


def nats_in_flows(topo: Topology, flows: list[str]) -> set[str]:
    """The NAT nodes a dumped flow table sends traffic to (a port of theirs in an output action)."""
    return set(_nats_in_flows(layout(topo), flows))


def networks(topo: Topology) -> tuple[str, ...]:
    """The data networks NAT nodes join, in file order (their tunnel keys follow it): ``inside``, ``public`` for one pair."""
    joined = {net for n in topo.nats.values() for net in n.pair}
    return tuple(n for n in topo.networks if n in joined)


def tunnel_key(topo: Topology, network: str, towards: str) -> int:
    """The tunnel key of a network and direction (see :func:`natmig.controller.fabric.tunnel_code`)."""
    return tunnel_code(network, towards, networks(topo))


def tunnel_ports(topo: Topology, machine: str) -> dict[str, tuple[str, str, str, int]]:
    """Tunnel port name -> (peer machine, network, direction, OpenFlow port) on ``machine``'s switch.

    Named ``t<peer>-<key>`` (the tunnel key, 1..4 for one pair of networks,
    see :func:`natmig.controller.fabric.tunnel_code`) and numbered
    ``200 + 10 * <peer's index> + <key>`` (``100 *`` with ten keys or
    more): the same key on both ends, so a frame sent into ``tB-1`` on A
    arrives on B's ``tA-1``.
    """
    nets = networks(topo)
    stride = 10 if 2 * len(nets) < 10 else 100
    out = {}
    for i, peer in enumerate(topo.machines):
        if peer == machine:
            continue
        for network in nets:
            for towards in DIRECTIONS:
                code = tunnel_code(network, towards, nets)
                out[f"t{peer}-{code}"] = (peer, network, towards, 200 + stride * i + code)
    return out


def machine_ports(topo: Topology, machine: str) -> dict[str, int]:
    """Switch port name -> OpenFlow port number on ``machine``'s switch: local hosts, local NAT legs, tunnels."""
    local = set(topo.on_machine(machine))
    ports = {name: n for name, n in port_names(topo).items() if name.rsplit("-", 1)[0] in local or name in local}
    ports.update({name: t[3] for name, t in tunnel_ports(topo, machine).items()})
    return ports


def fabric(topo: Topology) -> Fabric:
    """The switches of a topology with machines, as the fabric planner sees them.

    Without machines, the one switch is the machine named "" (no tunnels):
    how one switch steers several NAT instances, each on its own.
    """
    ports = port_names(topo)
    nets = networks(topo)
    machines = {}
    for name in topo.machines or [""]:
        hosts = {net: tuple(ports[h.name] for h in topo.hosts_on(net) if h.machine == name) for net in nets}
        nats = {n.name: NatPorts(ports[nat_port(n.name, "inside")], ports[nat_port(n.name, "public")])
                for n in topo.nats.values() if n.machine == name}
        tunnels = {(peer, net, towards): ofport for peer, net, towards, ofport in tunnel_ports(topo, name).values()}
        machines[name] = MachinePorts(name, hosts, nats, tunnels)
    pairs = topo.pairs()
    # Each instance's public addresses: what tells it apart on a public network it shares.
    addresses = {inside: tuple(sorted({a for n in twins for a in topo.public_addresses_of(n)}, key=_ip_order)) for (inside, _), twins in pairs.items()}
    macs = {inside: topo.networks[inside].gateway_mac for inside, _ in pairs}
    nat_pairs = {n.name: n.pair for n in topo.nats.values()}
    first_inside = topo.nats[topo.active_nat].inside
    return Fabric(topo.bridge, machines, topo.networks[first_inside].gateway_mac, _PRIORITY, COOKIE, nat_pairs, nets, addresses, macs)


def _ip_order(address: str) -> tuple[int, ...]:
    return tuple(int(x) for x in address.split("."))


def machine_plan(topo: Topology, machine: str, active: str | tuple[str, ...]) -> str:
    """The whole flow table of ``machine``'s switch steering through ``active`` (one NAT, or one per network pair; one flow a line)."""
    for a in [active] if isinstance(active, str) else active:
        if a not in topo.nats:
            raise ValueError(f"{a!r} is not a NAT node of topology {topo.name} (one of: {', '.join(topo.nats)})")
    return "".join(f"{line}\n" for line in machine_table(fabric(topo), machine, active))
