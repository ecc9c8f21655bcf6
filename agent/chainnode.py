"""A chained node: a stateful firewall, then a NAT, in one namespace, on one conntrack table.

A connection from the inside passes the firewall's forward chain (table
``natmig_fw``, :mod:`.fwnode`) and is then translated in postrouting (table
``natmig``, :mod:`.natnode`).  The kernel keeps one entry for it, which is
both a firewall session (fw-state ``session``: its state, lifetime, mark)
and a NAT session (nat-session: its translation).  A connection the NAT does
not translate (from the public side to an inside service) is a firewall
session only.

The two tables are the two nodes' own, configured NAT first: what the
namespace shares between them is set once, and what each needs of it is
said in :func:`shared_sysctls`.  Admission (natmig-state's admit-new) is the
firewall's, which holds new connections on both legs; the NAT's own
admission stays open (its hold would mark the same packets a second time).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .. import netns

from .fwnode import FwNode, FwNodeConfig
from .fwnode import sysctls as fw_sysctls
from .natnode import NatNode, NatNodeConfig
from .natnode import sysctls as nat_sysctls


def nat_config(fw: FwNodeConfig, public_address: str | None = None, port_range: tuple[int, int] = (20000, 29999)) -> NatNodeConfig:
    """The NAT half of a chained node on the firewall's legs: the inside network translated to ``public_address`` (default: the outside leg's)."""
    inside = ipaddress.IPv4Interface(fw.inside_address)
    return NatNodeConfig(
        name=fw.name, inside_if=fw.inside_if, outside_if=fw.outside_if, inside_address=fw.inside_address,
        outside_address=fw.outside_address, public_address=public_address or str(ipaddress.IPv4Interface(fw.outside_address).ip),
        inside_subnet=str(inside.network), port_range=port_range, inside_mac=fw.inside_mac, outside_mac=fw.outside_mac,
        mgmt_if=fw.mgmt_if, mgmt_address=fw.mgmt_address,
    )


def shared_sysctls(fw: FwNodeConfig, nat: NatNodeConfig) -> dict[str, tuple[int, int]]:
    """Sysctls both halves set to different values: (the NAT's, the firewall's).  The chained node keeps the firewall's.

    ``nf_conntrack_tcp_be_liberal`` is the one today: the NAT sets it for the
    whole namespace because an injected entry has no window data; the
    firewall leaves it off and marks the entries it writes BE_LIBERAL
    instead, so that traffic's own entries keep their window checks.
    """
    a, b = nat_sysctls(nat), fw_sysctls(fw)
    return {k: (a.get(k, 0), b.get(k, 0)) for k in sorted(a.keys() | b.keys()) if a.get(k, 0) != b.get(k, 0)}


@dataclass
class ChainNode:
    """Configures the firewall then NAT of one namespace (``fw`` and ``nat`` name the same namespace and legs)."""

    fw: FwNodeConfig
    nat: NatNodeConfig

    def __post_init__(self) -> None:
        from .fwnode import FwNodeError

        same = (self.fw.name, self.fw.inside_if, self.fw.outside_if) == (self.nat.name, self.nat.inside_if, self.nat.outside_if)
        if not same:
            raise FwNodeError(f"chained node {self.fw.name}: the firewall and the NAT must name the same namespace and legs")

    def configure(self) -> None:
        """The NAT's table and sysctls, then the firewall's (whose values of a shared sysctl win: :func:`shared_sysctls`)."""
        NatNode(self.nat, hold=False).configure()
        FwNode(self.fw).configure()
        wins = [f"{key}={fw_value}" for key, (_, fw_value) in shared_sysctls(self.fw, self.nat).items()]
        if wins:
            netns.run(["sysctl", "-q", "-w", *wins], self.fw.name)
