"""What a migration will do, decided before anything is touched (pure functions).

The controller plans first and acts second (the faucet split): which
sessions to copy, whether the target can take them, how the events seen
during the copy change the target, which sessions the target still lacks
after the switch, and which OpenFlow rules move traffic.  Nothing here does
I/O, so every decision is unit-tested without root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from .. import pool
from ..errors import ControllerError
from ..model import NatSession, SessionKey, format_key

#: Event kinds as the NETCONF notification names them, and as a provider's
#: watch names them; both spellings mean the same two things.
EVENT_KINDS: Mapping[str, str] = {
    "created": "created",
    "new": "created",
    "destroyed": "destroyed",
    "destroy": "destroyed",
}

def mapping(s: NatSession) -> tuple[str, int]:
    """The public side of a session: what must not change across a migration."""
    return (s.translated_address, s.translated_port)


@dataclass(frozen=True)
class Conflict:
    """A target session that stands in the way of a source session."""

    key: SessionKey
    why: str

    def __str__(self) -> str:
        return f"{format_key(self.key)}: {self.why}"


@dataclass(frozen=True)
class CopyPlan:
    """The sessions to write into the target, and the target's own sessions left alone.

    ``already`` are source sessions the target already holds with the same
    mapping (a repeated migration); they are written again (harmless) but are
    not removed on rollback, because they were there before.
    """

    sessions: list[NatSession]
    already: frozenset[SessionKey]
    target_before: int

    @property
    def added_keys(self) -> list[SessionKey]:
        """Keys this migration adds to the target: what a rollback removes."""
        return [s.key for s in self.sessions if s.key not in self.already]


def public_addresses(sessions: Iterable[NatSession]) -> set[str]:
    """Every translated address a table uses."""
    return {s.translated_address for s in sessions}


def foreign_addresses(source_public: set[str], target_public: set[str] | None) -> list[Conflict]:
    """A conflict for each translated address of the source the target does not own (none when that is unknown)."""
    if target_public is None:
        return []
    owned = pool.describe(target_public)
    return [Conflict(("*", addr, 0, "*", 0), f"source translates to {addr}, which the target does not own ({owned})")
            for addr in sorted(source_public - set(target_public))]


def plan_copy(
    source: Sequence[NatSession],
    target: Sequence[NatSession],
    target_public: set[str] | None = None,
) -> CopyPlan:
    """Plan the copy of ``source`` into a target holding ``target``.

    The target must be idle (no sessions) or compatible: none of its sessions
    may hold a source key with another mapping, or the reply tuple (public
    endpoint towards the same remote) of a source session.  When ``target_public`` is known, every translated
    address of the source must be one of them.  Raises :class:`PlanError`
    listing every conflict.
    """
    conflicts = foreign_addresses(public_addresses(source), target_public)
    by_key = {s.key: s for s in target}
    by_reply = {s.reply_key: s.key for s in target}
    already: set[SessionKey] = set()
    for s in source:
        t = by_key.get(s.key)
        if t is not None:
            if mapping(t) == mapping(s):
                already.add(s.key)
                continue
            conflicts.append(Conflict(s.key, f"target maps it to {t.translated_address}:{t.translated_port}, source to {s.translated_address}:{s.translated_port}"))
            continue
        holder = by_reply.get(s.reply_key)
        if holder is not None:
            conflicts.append(Conflict(s.key, f"its public {s.protocol} {s.translated_address}:{s.translated_port} towards {s.dst_address}:{s.dst_port} is held on the target by {format_key(holder)}"))
    if conflicts:
        raise PlanError(conflicts)
    return CopyPlan(list(source), frozenset(already), len(target))


@dataclass
class CatchUp:
    """The net effect of a stream of events on the target: sessions to write, keys to delete.

    Events are folded per key, last one wins: a session created then
    destroyed is deleted, destroyed then created (a new session on a reused
    5-tuple) is written.  Writing a session the snapshot already had is
    harmless (create-or-replace with the same values).
    """

    upserts: dict[SessionKey, NatSession] = field(default_factory=dict)
    deletes: set[SessionKey] = field(default_factory=set)
    events: int = 0

    def add(self, kind: str, session: NatSession) -> None:
        """Fold one event in; ``kind`` is created/destroyed (or new/destroy)."""
        what = EVENT_KINDS.get(kind)
        if what is None:
            raise PlanError([Conflict(session.key, f"unknown event kind {kind!r}; expected one of {', '.join(sorted(EVENT_KINDS))}")])
        self.events += 1
        k = session.key
        if what == "created":
            self.deletes.discard(k)
            self.upserts[k] = session
        else:
            self.upserts.pop(k, None)
            self.deletes.add(k)

    def extend(self, events: Iterable[tuple[str, NatSession]]) -> "CatchUp":
        """Fold many events in, in order; returns self."""
        for kind, s in events:
            self.add(kind, s)
        return self

    def take(self) -> tuple[list[NatSession], list[SessionKey]]:
        """The pending writes and deletes, leaving this empty."""
        ups, dels = list(self.upserts.values()), sorted(self.deletes, key=_sort_key)
        self.upserts.clear()
        self.deletes.clear()
        return ups, dels


def expected_table(snapshot: Iterable[NatSession], events: Iterable[tuple[str, NatSession]]) -> dict[SessionKey, NatSession]:
    """The source table implied by a snapshot followed by events (what the target should hold)."""
    table = {s.key: s for s in snapshot}
    for kind, s in events:
        if EVENT_KINDS.get(kind) == "created":
            table[s.key] = s
        else:
            table.pop(s.key, None)
    return table


@dataclass(frozen=True)
class Verdict:
    """How the target compares with the source at the switch.

    ``missing``: source sessions the target lacks; ``remapped``: sessions the
    target holds with another public address or port.  The migration is good
    when both are empty; ``extra`` (target-only sessions) is allowed.
    """

    missing: list[NatSession]
    remapped: list[tuple[NatSession, NatSession]]
    extra: int
    checked: int

    @property
    def ok(self) -> bool:
        """Every source session is on the target with the same mapping."""
        return not self.missing and not self.remapped

    def describe(self, limit: int = 5) -> str:
        """A short human summary naming the first offenders."""
        if self.ok:
            return f"all {self.checked} source sessions on the target with the same mapping"
        parts = []
        if self.missing:
            shown = ", ".join(str(s) for s in self.missing[:limit])
            parts.append(f"{len(self.missing)} missing on the target ({shown}{', ...' if len(self.missing) > limit else ''})")
        if self.remapped:
            shown = ", ".join(f"{s} became {t.translated_address}:{t.translated_port}" for s, t in self.remapped[:limit])
            parts.append(f"{len(self.remapped)} re-mapped ({shown}{', ...' if len(self.remapped) > limit else ''})")
        return "; ".join(parts)


def compare(source: Iterable[NatSession], target: Iterable[NatSession]) -> Verdict:
    """Check source ⊆ target by key with identical translation."""
    tgt = {s.key: s for s in target}
    missing: list[NatSession] = []
    remapped: list[tuple[NatSession, NatSession]] = []
    n = 0
    seen: set[SessionKey] = set()
    for s in source:
        n += 1
        seen.add(s.key)
        t = tgt.get(s.key)
        if t is None:
            missing.append(s)
        elif mapping(t) != mapping(s):
            remapped.append((s, t))
    extra = sum(1 for k in tgt if k not in seen)
    return Verdict(missing, remapped, extra, n)


# ---------------------------------------------------------------- OpenFlow


@dataclass(frozen=True)
class NatPorts:
    """The switch ports a NAT node hangs off: its inside and its outside leg."""

    inside: int
    outside: int

    def leg(self, network: str) -> int:
        """The port of the leg on ``network`` (``inside`` or ``public``)."""
        return self.inside if network == "inside" else self.outside


#: The two data networks a NAT joins, in the order their flows are planned.
NETWORKS = ("inside", "public")


@dataclass(frozen=True)
class SwitchLayout:
    """How the client, the server and the NATs attach to the bridge.

    Traffic is steered by input port only (both NATs share their addresses
    and MACs, so only the output port changes at the switch).  The rules
    from NAT ports back to the hosts are static: they exist for every NAT at
    all times, so packets still in flight through the old NAT arrive.
    ``gateway_mac`` is the inside MAC the NATs share; given, the steering
    also hairpins what a NAT sends to it (see :func:`hairpin_flows`).

    Each data network is a hub: with ``more_inside_hosts`` or
    ``more_public_hosts`` (an emulated network with several clients), a
    host's frames go to the other hosts of its network too.  ``cookie``,
    given, marks every flow (a dump then shows whose flows they are).
    """

    bridge: str
    client_port: int
    server_port: int
    nats: Mapping[str, NatPorts]
    priority: int = 100
    gateway_mac: str | None = None
    more_inside_hosts: tuple[int, ...] = ()
    more_public_hosts: tuple[int, ...] = ()
    cookie: int | None = None

    def nat(self, name: str) -> NatPorts:
        """Ports of a NAT by name; :class:`PlanError` naming the known ones otherwise."""
        try:
            return self.nats[name]
        except KeyError:
            raise PlanError([Conflict(("*", name, 0, "*", 0), f"no NAT named {name!r} on bridge {self.bridge} (known: {', '.join(sorted(self.nats)) or 'none'})")]) from None

    def hosts(self, network: str) -> tuple[int, ...]:
        """The host ports on ``network`` (``inside``: the client first; ``public``: the server first)."""
        if network == "inside":
            return (self.client_port, *self.more_inside_hosts)
        return (self.server_port, *self.more_public_hosts)

    def flow(self, rule: str) -> str:
        """One flow in ovs-ofctl syntax: ``rule`` with the layout's cookie, if any."""
        return rule if self.cookie is None else f"cookie={self.cookie:#x},{rule}"


def _outputs(ports: Iterable[int]) -> str:
    return ",".join(f"output:{p}" for p in ports)


def _hub_flows(layout: SwitchLayout, network: str, active: NatPorts) -> list[str]:
    """From each host of ``network``: to the other hosts and to the active NAT's leg there (the steering rules)."""
    hosts = layout.hosts(network)
    leg = active.leg(network)
    return [layout.flow(f"priority={layout.priority},in_port={p},actions={_outputs(q for q in (*hosts, leg) if q != p)}") for p in hosts]


def _return_flow(layout: SwitchLayout, network: str, nat: NatPorts) -> str:
    """From a NAT's leg on ``network`` to every host there (a static rule)."""
    return layout.flow(f"priority={layout.priority},in_port={nat.leg(network)},actions={_outputs(layout.hosts(network))}")


def steering_flows(layout: SwitchLayout, nat: str) -> list[str]:
    """The rules that send both directions through ``nat`` (ovs-ofctl flow syntax).

    One rule per host (the client's and the server's: one per direction),
    and with a ``gateway_mac`` the :func:`hairpin_flows` of every NAT.
    Applied as one bundle, they replace the rules of the same match, so the
    move is atomic: no packet sees one direction moved and not the other,
    and a packet a NAT releases is sent to the NAT that carries traffic at
    that instant.
    """
    active = layout.nat(nat)
    return [f for network in NETWORKS for f in _hub_flows(layout, network, active)] + _hairpins(layout, nat)


def _hairpins(layout: SwitchLayout, active: str) -> list[str]:
    """:func:`hairpin_flows` of the layout's NATs (none without a ``gateway_mac``), above the return rules."""
    if layout.gateway_mac is None:
        return []
    inside = {n: ports.inside for n, ports in layout.nats.items()}
    return [layout.flow(f) for f in hairpin_flows(inside, active, layout.gateway_mac, layout.priority + 1)]


def hairpin_flows(inside_ports: Mapping[str, int], active: str, gateway_mac: str, priority: int) -> list[str]:
    """One rule per NAT: what it sends to the gateway MAC goes to ``active``'s inside port.

    A NAT whose admission was closed holds the packets that would create a
    session and, when admission opens, sends them back out of its inside
    leg addressed to the gateway (its own MAC, shared by every NAT; see
    ``agent/nfqueue.py``).  Nothing else a NAT sends is addressed to that
    MAC, so these rules only catch released packets, and send them to
    whichever NAT is active then: the target when the source releases after
    the switch, the NAT itself (``output:in_port``: OpenFlow never sends a
    packet back out of its input port otherwise) when it is the active one.
    ``priority`` must be above the static return rule of the same port.
    """
    out = []
    for name in sorted(inside_ports):
        port = inside_ports[name]
        to = "in_port" if name == active else str(inside_ports[active])
        out.append(f"priority={priority},in_port={port},dl_dst={gateway_mac},actions=output:{to}")
    return out


def static_flows(layout: SwitchLayout) -> list[str]:
    """The return rules from every NAT to the hosts (set once, never changed)."""
    return [_return_flow(layout, network, layout.nats[name]) for name in sorted(layout.nats) for network in NETWORKS]


def flow_table(layout: SwitchLayout, active: str) -> list[str]:
    """The bridge's whole flow table steering through ``active``: what a replace-flows bundle installs.

    The :func:`static_flows`, the :func:`steering_flows` and a lowest rule
    that drops what nothing matched (a bridge in secure fail mode drops a
    miss anyway; with the rule a dump says so and counts it).  Moving traffic
    is replacing this table with the one of another NAT: only the steering
    rules differ.  Listed network by network, each host's rule before the
    NATs' return rules.
    """
    ports = layout.nat(active)
    out = []
    for network in NETWORKS:
        out += _hub_flows(layout, network, ports)
        out += [_return_flow(layout, network, nat) for nat in layout.nats.values()]
    out += _hairpins(layout, active)
    out.append(layout.flow("priority=0,actions=drop"))
    return out


_OUTPUT = re.compile(r"output:(\d+)")


def nats_in_flows(layout: SwitchLayout, flows: Iterable[str]) -> list[str]:
    """The NATs some flow sends traffic to (a port of theirs in an output action), in the layout's order.

    Read from a dump (``ovs-ofctl dump-flows``): the NAT traffic goes
    through is the one the hosts' rules output to.  A hairpin's
    ``IN_PORT`` names no NAT, and return rules output to hosts only.
    """
    used = {int(m.group(1)) for line in flows for m in _OUTPUT.finditer(line)}
    return [name for name, p in layout.nats.items() if p.inside in used or p.outside in used]


class PlanError(ControllerError):
    """The migration cannot be planned; ``conflicts`` says why, per session."""

    def __init__(self, conflicts: list[Conflict]) -> None:
        self.conflicts = list(conflicts)
        shown = [str(c) for c in self.conflicts[:10]]
        if len(self.conflicts) > 10:
            shown.append(f"... and {len(self.conflicts) - 10} more")
        super().__init__(f"{len(self.conflicts)} conflict(s):\n  " + "\n  ".join(shown))


def _sort_key(k: SessionKey) -> tuple:
    return tuple(str(x) for x in k)
