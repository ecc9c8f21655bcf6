"""Building a testbed: its namespaces, the veths that join them, addresses, routes, and the switches with their flows.

:meth:`natmig.testbed.bed.Testbed.up` calls :func:`build` under the prefix's
lock; nothing is made in the root namespace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import netns
from . import flows

if TYPE_CHECKING:  # the testbed is built through its own names; bed imports this module
    from .bed import Testbed


#: Interface names inside the namespaces (the switch side is named by flows.port_names).
HOST_IF = "eth0"
NAT_INSIDE_IF = "inside0"
NAT_OUTSIDE_IF = "outside0"
NAT_MGMT_IF = "mgmt0"
MGMT_BRIDGE = "mgmtbr"
#: The underlay: its Linux bridge, each machine's veth end and OVS bridge, and their MTU
#: (1600: a 1500-byte inner frame plus the tunnel header fits; with 1500 TCP stalls).
UNDERLAY_BRIDGE = "ulbr"
UNDERLAY_IF = "phy0"
PHY_BRIDGE = "br-phy"
UNDERLAY_MTU = 1600


def build(tb: Testbed) -> None:
    """Make every namespace, link, address and switch of ``tb``'s topology (``Testbed.up`` removes it all if this fails)."""
    topo = tb.topology
    mg = tb.mgmt_netns
    for ns in tb.namespaces():
        netns.add(ns)
    for ovs in tb.switches.values():
        ovs.start()
    if topo.multi_machine:
        build_underlay(tb)
    # The management network: a bridge holding the controller's address.
    msub = topo.management.subnet
    ip_batch(mg, [
        f"link add {MGMT_BRIDGE} type bridge",
        f"addr add {topo.management.controller}/{msub.prefixlen} dev {MGMT_BRIDGE}",
        f"link set {MGMT_BRIDGE} up",
    ])
    # veths are made from the switch (or management) namespace with the
    # far end placed in the node, so no name is ever taken in the root namespace.
    for host in topo.hosts.values():
        ns = tb.netns(host.name)
        netns.add_veth(host.name, HOST_IF, tb.node_switch(host.name), ns)
        net = topo.networks[host.network]
        cmds = [f"addr add {host.address}/{net.subnet.prefixlen} dev {HOST_IF}"]
        pair = next((p for p in topo.pairs() if host.network in p), None)
        if pair is not None and host.network == pair[0]:
            # One route, to its instance's public subnet through the NAT
            # gateway: no default route, nothing that could leave the machine.
            cmds.append(f"route add {topo.networks[pair[1]].subnet} via {net.gateway}")
        elif pair is not None and topo.function == "firewall":
            # Nothing is translated: the public side reaches the inside network through the firewall.
            cmds.append(f"route add {topo.networks[pair[0]].subnet} via {net.gateway}")
        ip_batch(ns, cmds)
    for nat in topo.nats:
        ns = tb.netns(nat)
        sw = tb.node_switch(nat)
        netns.add_veth(flows.nat_port(nat, "inside"), NAT_INSIDE_IF, sw, ns)
        netns.add_veth(flows.nat_port(nat, "public"), NAT_OUTSIDE_IF, sw, ns)
        netns.add_veth(f"m-{nat}", NAT_MGMT_IF, mg, ns)
        ip_batch(mg, [f"link set m-{nat} master {MGMT_BRIDGE}"])
        (tb.fw_node(nat) if topo.function == "firewall" else tb.nat_node(nat)).configure()
    if not topo.multi_machine:
        tb.ovs.add_bridge(tb.bridge, tb.switch_ports())
        tb.ovs.replace_flows(tb.bridge, flows.machine_plan(topo, "", topo.active_nats) if tb.per_instance else tb.flows_for(topo.active_nat))
        return
    assert topo.underlay is not None
    for m, ovs in tb.switches.items():
        # One tunnel key per network and direction (fabric.tunnel_code): a port each, so rules match on the port alone.
        tunnels = {name: [f"type={topo.underlay.tunnel}", f"options:remote_ip={topo.machines[peer].underlay}", f"options:key={flows.tunnel_key(topo, net, towards)}"]
                   for name, (peer, net, towards, _) in flows.tunnel_ports(topo, m).items()}
        ovs.add_bridge(tb.bridge, tb.switch_ports(m), tunnels)
        ovs.replace_flows(tb.bridge, flows.machine_plan(topo, m, topo.active_nats))

def build_underlay(tb: Testbed) -> None:
    """The machines' underlay: a Linux bridge in its own namespace, a veth to each machine's ``br-phy``."""
    topo = tb.topology
    assert topo.underlay is not None
    ul = tb.underlay_netns
    ip_batch(ul, [f"link add {UNDERLAY_BRIDGE} type bridge", f"link set {UNDERLAY_BRIDGE} mtu {UNDERLAY_MTU}", f"link set {UNDERLAY_BRIDGE} up"])
    for m, machine in topo.machines.items():
        ns = tb.machine_netns(m)
        netns.add_veth(f"u-{m}", UNDERLAY_IF, ul, ns, mtu=UNDERLAY_MTU)
        ip_batch(ul, [f"link set u-{m} master {UNDERLAY_BRIDGE}"])
        # The machine's tunnel endpoint: an OVS bridge holding the address
        # (Open vSwitch's userspace tunnels route and resolve through it).
        tb.switches[m].add_phy_bridge(PHY_BRIDGE, UNDERLAY_IF, UNDERLAY_MTU)
        netns.disable_offloads(PHY_BRIDGE, ns)
        ip_batch(ns, [f"addr add {machine.underlay}/{topo.underlay.subnet.prefixlen} dev {PHY_BRIDGE}", f"link set {PHY_BRIDGE} up"])


def ip_batch(ns: str, cmds: list[str]) -> None:
    """Run several `ip` commands in one process (``ip -n NS -batch -``): one fork instead of many."""
    netns.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
