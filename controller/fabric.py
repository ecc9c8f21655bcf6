"""Steering across several switches joined by tunnels: the flows of each, and a move as ordered steps (pure).

With NAT nodes on several machines, each machine has its own switch and
no OpenFlow bundle spans two of them: moving a NAT to another machine is a
sequence of per-switch changes.  This module computes them, and nothing
here does I/O (the faucet split: plan here, send in
:class:`~natmig.controller.steering.FabricSteering`).

Each machine's switch has its local hosts and NAT legs, and four tunnel
ports to every other machine, one per data network and direction (each a
tunnel key of its own): ``nat`` carries frames from hosts towards the
active NAT, ``hosts`` frames from a NAT towards the hosts.  Keeping the
directions on separate ports lets every rule match on the input port
alone, as on one switch, and lets the active NAT be read back from the
output ports.  The rules of a machine (``role`` of each :class:`Flow`):

- ``return`` (static): from a local NAT's leg to the local hosts of that
  network and to the ``hosts`` tunnel of every machine with hosts there;
  from a ``hosts`` tunnel to the local hosts.  The same for every NAT at
  all times: a packet still in flight through the old NAT arrives.
- ``ingress`` (steering): from a local host to the other local hosts and
  towards the active NAT: its local leg, or the ``nat`` tunnel of its
  machine; and the hairpins (what a NAT releases to the gateway MAC goes to
  the active NAT, see :func:`~natmig.controller.plan.hairpin_flows`).
- ``tunnel-in`` (steering): from a ``nat`` tunnel to the active NAT's leg
  when the active NAT is on this machine; dropped elsewhere.
- ``neighbour`` (static): a host's ARP goes to every NAT (see below).

A move from NAT ``X`` to NAT ``Z`` (:func:`plan_move`), make-before-break:
*prepare* (Z's machine accepts tunnelled traffic for Z), *ingress* (each
switch, one bundle each, sends its hosts' traffic to Z), *retire* (X's
machine stops accepting tunnelled traffic for X).  Between ingress steps
some hosts reach X and others Z: both hold every session with the same
mapping (X is frozen, not emptied, until the move is verified) and share
the gateway addresses and MACs, so either translates any packet the same
way (docs/multihost.md).  Only neighbour resolution would not: the new
NAT's ARP request reaches a host whose reply still goes to the old NAT, and
the new NAT retries a second later (a 2 s gap was measured); hence the
``neighbour`` rules.  With one machine the table is
:func:`~natmig.controller.plan.flow_table`'s plus those rules (a unit test
holds them equal otherwise).

Several NAT *instances* (each a pair of networks with its own active NAT,
:attr:`Fabric.pairs`) share the switches: every steering rule belongs to
one instance (on a public network they share, the rules match the
instance's own public addresses, ``nw_dst``), and a move plans the rules of
its own instance only, so moves of different instances in flight at once
never rewrite each other's rules (docs/multihost.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from .plan import NETWORKS, Conflict, NatPorts, PlanError

#: Tunnel directions: towards the active NAT, towards the hosts.
DIRECTIONS = ("nat", "hosts")
#: The stages of a move, in order.
STAGES = ("prepare", "ingress", "retire")


def tunnel_code(network: str, towards: str, networks: Sequence[str] = NETWORKS) -> int:
    """The tunnel key (and port-number offset) of a network and direction: 1..4 for the two networks of one pair, 1..2n for n networks."""
    return 1 + 2 * list(networks).index(network) + DIRECTIONS.index(towards)


@dataclass(frozen=True)
class MachinePorts:
    """One machine's switch: its local hosts per network, its local NATs, its tunnel ports.

    ``tunnels`` maps ``(peer machine, network, direction)`` to the OpenFlow
    port of that tunnel on this switch.
    """

    name: str
    hosts: Mapping[str, tuple[int, ...]]
    nats: Mapping[str, NatPorts]
    tunnels: Mapping[tuple[str, str, str], int] = field(default_factory=dict)

    def local_hosts(self, network: str) -> tuple[int, ...]:
        """Ports of the hosts of ``network`` on this machine."""
        return tuple(self.hosts.get(network, ()))


@dataclass(frozen=True)
class Fabric:
    """Every machine's switch, in order, and the flow conventions they share.

    Several NAT *instances* (docs/multihost.md) each serve their own pair of
    networks: ``pairs`` gives each NAT's (inside, public) networks (absent:
    the one pair ``inside``/``public``), ``networks`` every network in order
    (their tunnel keys follow it), ``addresses`` the public addresses of each
    pair by its inside network (what tells the instances apart on a public
    network they share), ``gateway_macs`` each inside network's gateway MAC
    (absent: ``gateway_mac``).  Each pair's steering rules are its own: a
    move of one instance never rewrites another's.
    """

    bridge: str
    machines: Mapping[str, MachinePorts]
    gateway_mac: str | None = None
    priority: int = 100
    cookie: int | None = None
    pairs: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    networks: tuple[str, ...] = NETWORKS
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gateway_macs: Mapping[str, str] = field(default_factory=dict)

    def pair(self, nat: str) -> tuple[str, str]:
        """The (inside, public) networks ``nat`` serves."""
        return tuple(self.pairs.get(nat, NETWORKS))  # type: ignore[return-value]

    def leg(self, nat: str, ports: NatPorts, network: str) -> int | None:
        """The port of ``nat``'s leg on ``network`` (None: it does not join it)."""
        inside, public = self.pair(nat)
        return ports.inside if network == inside else ports.outside if network == public else None

    def shared(self, network: str) -> bool:
        """Whether several instances (pairs) join ``network`` (a public network they share): their traffic is told apart by address."""
        return len({p for n in self._nats() if network in (p := self.pair(n))}) > 1

    def _nats(self) -> list[str]:
        return [n for m in self.machines.values() for n in m.nats]

    def inside_mac(self, inside: str) -> str | None:
        """The gateway MAC of an inside network (what a NAT's released packets are addressed to)."""
        return self.gateway_macs.get(inside, self.gateway_mac)

    def machine_of(self, nat: str) -> str:
        """The machine a NAT runs on; :class:`PlanError` naming the known NATs otherwise."""
        for m in self.machines.values():
            if nat in m.nats:
                return m.name
        known = sorted(n for m in self.machines.values() for n in m.nats)
        raise PlanError([Conflict(("*", nat, 0, "*", 0), f"no NAT named {nat!r} on any switch (known: {', '.join(known) or 'none'})")])

    def nat_ports(self, nat: str) -> NatPorts:
        """The ports of a NAT on its own machine's switch."""
        return self.machines[self.machine_of(nat)].nats[nat]

    def flow(self, rule: str) -> str:
        """One flow in ovs-ofctl syntax, with the fabric's cookie if any."""
        return rule if self.cookie is None else f"cookie={self.cookie:#x},{rule}"


@dataclass(frozen=True)
class Flow:
    """One rule of a switch: its match (what a later rule of the same match replaces), its actions, its role."""

    match: str
    actions: str
    role: str

    def line(self, fabric: Fabric) -> str:
        """The rule in ovs-ofctl flow syntax."""
        return fabric.flow(f"{self.match},actions={self.actions}")


@dataclass(frozen=True)
class Step:
    """One change of one switch: ``flows`` applied as one bundle; ``undo`` restores what they replaced."""

    switch: str
    stage: str
    flows: tuple[str, ...]
    undo: tuple[str, ...]

    def reverse(self) -> "Step":
        """The step that undoes this one."""
        return Step(self.switch, f"undo {self.stage}", self.undo, self.flows)


def _outputs(ports: Iterable[int]) -> str:
    out = ",".join(f"output:{p}" for p in ports)
    return out or "drop"


#: Every role a rule can have (see the module's docstring).
ROLES = frozenset({"return", "ingress", "tunnel-in", "neighbour", "hub"})


#: What steers one pair: (the active NAT, its machine, its ports).
_Active = tuple[str, str, NatPorts]


def machine_flows(fabric: Fabric, machine: str, active: str | Iterable[str], roles: frozenset[str] = ROLES) -> list[Flow]:
    """The rules of ``machine``'s switch with traffic through ``active`` (the drop-all rule aside), those of ``roles`` only.

    ``active``: one NAT, or one per pair (a pair with none named gets no steering rules).
    """
    names = [active] if isinstance(active, str) else list(active)
    return _flows(fabric, machine, _actives(fabric, names), roles)


def _actives(fabric: Fabric, names: Iterable[str]) -> dict[tuple[str, str], _Active]:
    out: dict[tuple[str, str], _Active] = {}
    for nat in names:
        where = fabric.machine_of(nat)
        out[fabric.pair(nat)] = (nat, where, fabric.machines[where].nats[nat])
    return out


def _flows(fabric: Fabric, machine: str, actives: Mapping[tuple[str, str], _Active], roles: frozenset[str]) -> list[Flow]:
    # The active NATs' machines and ports are given, so that planning a move
    # looks them up once, not once per switch.
    m = fabric.machines[machine]
    prio = fabric.priority
    # Only the return, tunnel-in and neighbour rules have one rule per peer:
    # skipping them keeps the ingress rules of a switch O(its own ports).
    peers = [p for p in fabric.machines if p != machine] if roles - {"ingress"} else []
    out: list[Flow] = []
    for network in fabric.networks:
        hosts = m.local_hosts(network)
        shared = fabric.shared(network)
        steer = [(pair, a) for pair, a in actives.items() if network in pair]
        legs_here = [leg for name, ports in m.nats.items() if (leg := fabric.leg(name, ports, network)) is not None]
        if "ingress" in roles:
            for pair, (active, where, act) in steer:
                leg = fabric.leg(active, act, network)
                assert leg is not None
                towards = leg if where == machine else m.tunnels[(where, network, "nat")]
                for p in hosts:
                    if not shared:
                        out.append(Flow(f"priority={prio},in_port={p}", _outputs([*(q for q in hosts if q != p), towards]), "ingress"))
                        continue
                    # A public network several instances share: each instance's
                    # packets are those addressed to its own public addresses.
                    for addr in fabric.addresses.get(pair[0], ()):
                        out.append(Flow(f"priority={prio + 1},ip,in_port={p},nw_dst={addr}", _outputs([towards]), "ingress"))
        if shared and "hub" in roles:
            for p in hosts:
                out.append(Flow(f"priority={prio},in_port={p}", _outputs(q for q in hosts if q != p), "hub"))
        if "return" in roles:
            remote = [m.tunnels[(q, network, "hosts")] for q in peers if fabric.machines[q].local_hosts(network)]
            for leg in legs_here:
                out.append(Flow(f"priority={prio},in_port={leg}", _outputs([*hosts, *remote]), "return"))
            for q in peers:
                out.append(Flow(f"priority={prio},in_port={m.tunnels[(q, network, 'hosts')]}", _outputs(hosts), "return"))
        if "tunnel-in" in roles:
            for pair, (active, where, act) in steer:
                legs = [leg] if where == machine and (leg := fabric.leg(active, act, network)) is not None else []
                for q in peers:
                    tun = m.tunnels[(q, network, "nat")]
                    if not shared:
                        out.append(Flow(f"priority={prio},in_port={tun}", _outputs(legs), "tunnel-in"))
                        continue
                    for addr in fabric.addresses.get(pair[0], ()):
                        out.append(Flow(f"priority={prio + 1},ip,in_port={tun},nw_dst={addr}", _outputs(legs), "tunnel-in"))
        if shared and "hub" in roles:
            for q in peers:
                out.append(Flow(f"priority={prio},in_port={m.tunnels[(q, network, 'nat')]}", "drop", "hub"))
        if "neighbour" in roles:
            # Neighbour resolution reaches every NAT at all times: between two
            # ingress steps a host may still send to the old NAT while the new
            # one resolves it (its ARP reply would go to the old NAT and the new
            # one would wait a second to retry); so every NAT sees every host's ARP.
            nat_machines = [q for q in peers if any(fabric.leg(n, ports, network) is not None for n, ports in fabric.machines[q].nats.items())]
            for p in hosts:
                out.append(Flow(f"priority={prio + 1},arp,in_port={p}",
                                _outputs([*(q for q in hosts if q != p), *legs_here, *(m.tunnels[(q, network, "nat")] for q in nat_machines)]), "neighbour"))
            for q in peers:
                out.append(Flow(f"priority={prio + 1},arp,in_port={m.tunnels[(q, network, 'nat')]}", _outputs(legs_here), "neighbour"))
    if "ingress" in roles:
        # As plan.hairpin_flows: a NAT's released packets go to whichever NAT of its pair is active.
        for name in sorted(m.nats):
            pair = fabric.pair(name)
            mac = fabric.inside_mac(pair[0])
            if pair not in actives or mac is None:
                continue
            active, where, act = actives[pair]
            dest = "in_port" if name == active else (str(act.inside) if where == machine else str(m.tunnels[(where, pair[0], "nat")]))
            out.append(Flow(f"priority={prio + 1},in_port={m.nats[name].inside},dl_dst={mac}", f"output:{dest}", "ingress"))
    return out


def machine_table(fabric: Fabric, machine: str, active: str | Iterable[str]) -> list[str]:
    """The whole flow table of ``machine``'s switch (what a replace-flows bundle installs at bring-up)."""
    return [f.line(fabric) for f in machine_flows(fabric, machine, active)] + [fabric.flow("priority=0,actions=drop")]


def plan_move(fabric: Fabric, frm: str | None, to: str) -> list[Step]:
    """The ordered per-switch changes that move traffic from ``frm`` to ``to``, make-before-break.

    Prepare ``to``'s machine, move the ingress of each switch (in the
    fabric's machine order), retire ``frm``'s machine.  Only rules that
    change are in a step, and only rules of ``to``'s pair of networks (its
    instance): moves of other instances, even in flight on the same
    switches, are not touched.  Each step's ``undo`` holds the rules it
    replaces, so undoing the steps done, in reverse, is the rollback.
    ``frm`` None (the switches disagree or are unknown): every steering
    rule of the pair is rewritten, and there is nothing to undo to.
    """
    new_at = _actives(fabric, [to])
    if frm is not None and fabric.pair(frm) != fabric.pair(to):
        raise PlanError([Conflict(("*", frm, 0, "*", 0), f"{frm} serves networks {'/'.join(fabric.pair(frm))}, {to} serves "
                                                        f"{'/'.join(fabric.pair(to))}: a move is between twins of one instance")])
    old_at = _actives(fabric, [frm]) if frm is not None else None
    target = new_at[fabric.pair(to)][1]
    source = old_at[fabric.pair(to)][1] if old_at is not None else None
    # Both NATs on one machine: what reaches it through tunnels moves in the
    # same bundle as its own hosts (one switch, atomic, as without machines).
    same = source == target
    steps: list[Step] = []

    def add(machine: str, stage: str, roles: frozenset[str]) -> None:
        new = _flows(fabric, machine, new_at, roles)
        flows: tuple[str, ...]
        undo: tuple[str, ...]
        if old_at is None:
            flows, undo = tuple(f.line(fabric) for f in new), ()
        else:
            old = {f.match: f for f in _flows(fabric, machine, old_at, roles)}
            changed = [(f, old[f.match]) for f in new if old[f.match].actions != f.actions]
            flows, undo = tuple(f.line(fabric) for f, _ in changed), tuple(o.line(fabric) for _, o in changed)
        if flows:
            steps.append(Step(machine, stage, flows, undo))

    tunnel_in, ingress = frozenset({"tunnel-in"}), frozenset({"ingress"})
    if not same:
        add(target, "prepare", tunnel_in)
    for machine in fabric.machines:
        add(machine, "ingress", ingress | tunnel_in if same and machine == target else ingress)
    # Tunnel-in rules differ only where the active NAT was or will be.
    for machine in ([source] if source is not None and not same else [] if same else fabric.machines):
        if machine != target:
            add(machine, "retire", tunnel_in)
    return steps


def rollback(done: Sequence[Step]) -> list[Step]:
    """The steps that undo ``done`` (those applied, in order): each reversed, last first."""
    return [s.reverse() for s in reversed(done) if s.undo]


_IN_PORT = re.compile(r"in_port=(\d+)")
_OUTPUT = re.compile(r"output:(\d+)")
_NW_DST = re.compile(r"nw_dst=([0-9.]+)")


def _rule_outputs(dump: Iterable[str], port: int, address: str | None = None) -> list[int] | None:
    """The output ports of the rule matching on input ``port`` alone (no dl_dst), or with ``address`` on it and its ``nw_dst``, from a dump; None when absent."""
    for line in dump:
        m = _IN_PORT.search(line)
        if m is None or int(m.group(1)) != port or "dl_dst=" in line or ",arp," in line:
            continue
        dst = _NW_DST.search(line)
        if (dst.group(1) if dst else None) != address:
            continue
        _, _, actions = line.partition("actions=")
        return [int(p) for p in _OUTPUT.findall(actions)]
    return None


def routes(fabric: Fabric, dumps: Mapping[str, Sequence[str]], of: str | None = None) -> dict[tuple[str, str], str | None]:
    """For each machine and network with local hosts, the NAT its hosts' traffic reaches (None: none), read from dumped flows.

    Followed across a tunnel: a host rule's output to a ``nat`` tunnel is
    resolved on the peer's switch by that tunnel's rule there.  ``of``: the
    pair of that NAT only.  On a public network several instances share,
    each instance's route is that of its first public address, keyed
    ``"<network> of <inside network>"``.
    """
    pairs = [fabric.pair(of)] if of is not None else list(dict.fromkeys(fabric.pair(n) for n in fabric._nats()))
    out: dict[tuple[str, str], str | None] = {}
    for pair in pairs:
        twins = {n for n in fabric._nats() if fabric.pair(n) == pair}
        for network in pair:
            shared = fabric.shared(network)
            address = fabric.addresses.get(pair[0], (None,))[0] if shared else None
            key = f"{network} of {pair[0]}" if shared else network
            for name, m in fabric.machines.items():
                hosts = m.local_hosts(network)
                if not hosts:
                    continue
                reached: str | None = None
                ports = _rule_outputs(dumps.get(name, ()), hosts[0], address) or []
                for nat, legs in m.nats.items():
                    if nat in twins and fabric.leg(nat, legs, network) in ports:
                        reached = nat
                for (peer, net, towards), tport in m.tunnels.items():
                    if net != network or towards != "nat" or tport not in ports:
                        continue
                    far = fabric.machines[peer]
                    there = _rule_outputs(dumps.get(peer, ()), far.tunnels[(name, network, "nat")], address) or []
                    reached = next((nat for nat, legs in far.nats.items() if nat in twins and fabric.leg(nat, legs, network) in there), None)
                out[(name, key)] = reached
    return out
