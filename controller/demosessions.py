"""The tables the demos, the tests and the benchmarks move: made-up sessions, and loading them into a node."""

from __future__ import annotations

from typing import Sequence

from .. import pool
from ..errors import ControllerError
from ..model import NatSession
from ..pool import PublicRange
from .migrate import Endpoint

#: Made-up inside hosts are 10.0.0.100 and up, 50,000 source ports each.
_FIRST_HOST, _LAST_HOST, _PORTS_PER_HOST = 100, 254, 50_000


def synthetic_sessions(
    n: int,
    public: str | Sequence[PublicRange],
    nat_ports: tuple[int, int] | None = None,
    servers: Sequence[str] = ("203.0.113.200",),
    timeout: int = 900,
) -> list[NatSession]:
    """``n`` established sessions of made-up inside hosts, for a table to move.

    ``public`` is the NAT's public address with ``nat_ports`` its port range,
    or its pool (each address with its ranges).  The sessions' public ports
    lie outside the NAT's own ranges of their address, so they never collide
    with a mapping the NAT gives live traffic.  They are spread over the
    pool's addresses in turn, TCP and UDP alternate, and a public port is
    used again towards the next of ``servers`` once every free port of every
    address is taken, as Linux SNAT reuses a public port across destinations:
    2 x (free ports of the pool) x (servers) fit, ~109,000 per address and server
    beside a 10,000-port range.  ``timeout``: each session's remaining
    lifetime in seconds; a table must outlive what is measured on it (the
    kernel removes each entry when its timer runs out).
    """
    if not 1 <= timeout <= 0xFFFFFFFF:
        raise ControllerError(f"synthetic sessions: timeout {timeout} s is not within 1..{0xFFFFFFFF} (nat-session's timeout leaf)")
    if isinstance(public, str):
        if nat_ports is None:
            raise ControllerError("synthetic sessions: give the NAT's port range with its public address")
        public = (PublicRange(public, nat_ports),)
    entries = pool.check("synthetic sessions: pool", list(public))
    if not servers:
        raise ControllerError("synthetic sessions: no server address to open them towards")
    slots = _free_slots(entries)
    fit = 2 * len(slots) * len(servers)
    most_inside = 2 * (_LAST_HOST - _FIRST_HOST + 1) * _PORTS_PER_HOST
    if n > min(fit, most_inside):
        raise ControllerError(
            f"--sessions {n}: at most {min(fit, most_inside)} synthetic sessions fit beside the NAT's port ranges "
            f"({len(pool.addresses(entries))} public address(es), {len(slots)} free public ports in all, "
            f"{len(servers)} server(s), TCP and UDP); give the NAT a larger pool or the sessions more servers")
    out = []
    for i in range(n):
        proto = "TCP" if i % 2 == 0 else "UDP"
        j = i // 2
        addr, port = slots[j % len(slots)]
        out.append(NatSession(
            proto, f"10.0.0.{_FIRST_HOST + j // _PORTS_PER_HOST}", 1024 + j % _PORTS_PER_HOST,
            servers[j // len(slots)], 443, addr, port,
            "ESTABLISHED" if proto == "TCP" else None, timeout, True,
        ))
    return out


def _free_slots(entries: Sequence[PublicRange]) -> list[tuple[str, int]]:
    """Every (address, port) of the pool outside the NAT's own ranges, ports 1024 and up, the addresses taking turns."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        ranges.setdefault(e.address, []).append(e.ports)
    free = {a: [p for p in range(1024, 65536) if not any(lo <= p <= hi for lo, hi in rs)] for a, rs in ranges.items()}
    slots: list[tuple[str, int]] = []
    for k in range(max(map(len, free.values()))):
        slots += [(a, ports[k]) for a, ports in free.items() if k < len(ports)]
    return slots


def load_sessions(ep: Endpoint, sessions: list[NatSession], chunk: int = 50_000, target: str = "running") -> None:
    """Write sessions into a node's table through its agent, ``chunk`` an edit-config.

    Into running by default: the agent then reads only the entries an edit
    names (a ctnetlink GET each).  An edit of the candidate copies the whole
    running table first, and a commit compares it whole, so loading in
    chunks that way costs O(table) per chunk: at 1,000,000 sessions the 11th
    chunk of 50,000 outlasted the 30 s RPC timeout (measured, contended).
    ``target="candidate"`` commits after each chunk.
    """
    node = ep.open()
    try:
        for i in range(0, len(sessions), chunk):
            node.edit_sessions(sessions[i:i + chunk], target=target, operation="merge")
            if target == "candidate":
                node.commit()
    finally:
        node.close()
