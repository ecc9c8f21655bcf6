"""What a batch needs before it reaches the kernel: entry checks and the write plan.

Pure functions, unit-tested without root: :func:`validate` says why a node
cannot hold an entry, :func:`invalid_entries` does it for a whole batch fast,
and :func:`plan_apply` sorts a checked batch by the way each entry reaches
the kernel (see :mod:`.conntrack`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..model import NatSession, SessionKey
from . import ctnetlink as nl

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_UINT32 = 0xFFFFFFFF

#: sysctl (under net.netfilter.) holding the node's default timeout, by (protocol, state or assured).
DEFAULT_TIMEOUT_SYSCTL: dict[tuple[str, object], str] = {
    ("TCP", "SYN_SENT"): "nf_conntrack_tcp_timeout_syn_sent",
    ("TCP", "SYN_SENT2"): "nf_conntrack_tcp_timeout_syn_sent",
    ("TCP", "SYN_RECV"): "nf_conntrack_tcp_timeout_syn_recv",
    ("TCP", "ESTABLISHED"): "nf_conntrack_tcp_timeout_established",
    ("TCP", "FIN_WAIT"): "nf_conntrack_tcp_timeout_fin_wait",
    ("TCP", "CLOSE_WAIT"): "nf_conntrack_tcp_timeout_close_wait",
    ("TCP", "LAST_ACK"): "nf_conntrack_tcp_timeout_last_ack",
    ("TCP", "TIME_WAIT"): "nf_conntrack_tcp_timeout_time_wait",
    ("TCP", "CLOSE"): "nf_conntrack_tcp_timeout_close",
    ("UDP", True): "nf_conntrack_udp_timeout_stream",
    ("UDP", False): "nf_conntrack_udp_timeout",
    ("ICMP", True): "nf_conntrack_icmp_timeout",
    ("ICMP", False): "nf_conntrack_icmp_timeout",
}


def timeout_key(s: NatSession) -> tuple[str, object]:
    """The key of :data:`DEFAULT_TIMEOUT_SYSCTL` that gives ``s`` its default timeout."""
    return (s.protocol, s.tcp_state or "ESTABLISHED") if s.protocol == "TCP" else (s.protocol, s.assured)


def _port(v: object, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 65535


def validate(s: NatSession) -> str | None:
    """Why this node cannot hold ``s`` as given (None when it can): the invalid-entry check of apply."""
    if s.protocol not in nl.PROTO_NUMBERS:
        return f"protocol {s.protocol!r} is not one of {', '.join(nl.PROTO_NUMBERS)}"
    for leaf in ("src_address", "dst_address", "translated_address"):
        v = getattr(s, leaf)
        if not isinstance(v, str) or not _IPV4.fullmatch(v):
            return f"{leaf} {v!r} is not an IPv4 address (this node translates IPv4 only)"
    for leaf in ("src_port", "dst_port"):
        if not _port(getattr(s, leaf)):
            return f"{leaf} {getattr(s, leaf)!r} is not a port number 0..65535"
    if s.protocol == "ICMP":
        if s.dst_port != 0:
            return f"dst_port {s.dst_port} must be 0 for ICMP"
        if not _port(s.translated_port):
            return f"translated_port {s.translated_port!r} is not an echo identifier 0..65535"
    elif not _port(s.translated_port, 1):
        return f"translated_port {s.translated_port!r} is not a port number 1..65535"
    if s.protocol == "TCP":
        if s.tcp_state is not None and s.tcp_state not in nl.TCP_STATE_NUMBERS:
            return f"tcp_state {s.tcp_state!r} is not one of {', '.join(nl.TCP_STATE_NUMBERS)}"
    elif s.tcp_state is not None:
        return f"tcp_state is only valid for TCP, not {s.protocol}"
    if s.timeout is not None and not (isinstance(s.timeout, int) and 1 <= s.timeout <= _UINT32):
        return f"timeout {s.timeout!r} is not 1..{_UINT32} seconds"
    if not (isinstance(s.mark, int) and 0 <= s.mark <= _UINT32):
        return f"mark {s.mark!r} is not 0..{_UINT32}"
    if not isinstance(s.assured, bool):
        return f"assured {s.assured!r} is not a boolean"
    return None


_FAST_PROTOCOLS = {"TCP", "UDP"}


def invalid_entries(batch: Sequence[NatSession]) -> dict[SessionKey, str]:
    """:func:`validate` over a batch, by key; a fast pre-check spares the common TCP/UDP entry.

    The pre-check is one flat expression per entry (no generator, no call
    but the address match, each distinct address matched once): on a large
    batch this loop is a good part of apply's own time.
    """
    # Addresses already seen valid (a table repeats few of them); a dict, so
    # that remembering one is an expression: setdefault returns the True it stores.
    good: dict[str, bool] = {}
    ipv4 = _IPV4.fullmatch
    states = nl.TCP_STATE_NUMBERS
    fast = _FAST_PROTOCOLS
    top = _UINT32
    problems: dict[SessionKey, str] = {}
    for s in batch:
        p, st, t, m = s.protocol, s.tcp_state, s.timeout, s.mark
        a, b, c = s.src_address, s.dst_address, s.translated_address
        sp, dp, tp = s.src_port, s.dst_port, s.translated_port
        if not (
            p in fast
            and type(a) is str and (a in good or (ipv4(a) is not None and good.setdefault(a, True)))
            and type(b) is str and (b in good or (ipv4(b) is not None and good.setdefault(b, True)))
            and type(c) is str and (c in good or (ipv4(c) is not None and good.setdefault(c, True)))
            and type(sp) is int and 0 <= sp <= 65535
            and type(dp) is int and 0 <= dp <= 65535
            and type(tp) is int and 1 <= tp <= 65535
            and (st is None or (p == "TCP" and st in states))
            and (t is None or (type(t) is int and 1 <= t <= top))
            and type(m) is int and 0 <= m <= top
            and type(s.assured) is bool
        ) and (why := validate(s)) is not None:
            problems[s.key] = why
    return problems


def key_problem(key: object) -> str | None:
    """Why the kernel cannot be asked about ``key`` (None when it can): :func:`validate` of its leaves alone."""
    if not isinstance(key, tuple) or len(key) != 5:
        return f"{key!r} is not a key (protocol, src_address, src_port, dst_address, dst_port)"
    # A translation every protocol accepts: only the key's own leaves can be at fault.
    return validate(NatSession(*key, "0.0.0.0", 1))


def invalid_keys(keys: Sequence[object]) -> dict[int, str]:
    """:func:`key_problem` of each key, by index; a fast pre-check spares the common TCP/UDP/ICMP key.

    What a lookup or a delete of K keys checks before the keys become
    netlink messages (:class:`.ctlayout.TupleEncoder` packs only valid
    ones); as in :func:`invalid_entries`, each distinct address is matched once.
    """
    good: dict[str, bool] = {}  # as in invalid_entries
    ipv4 = _IPV4.fullmatch
    protocols = nl.PROTO_NUMBERS
    problems: dict[int, str] = {}
    for i, k in enumerate(keys):
        if type(k) is tuple and len(k) == 5:
            p, a, sp, b, dp = k
            if (
                p in protocols
                and type(a) is str and (a in good or (ipv4(a) is not None and good.setdefault(a, True)))
                and type(b) is str and (b in good or (ipv4(b) is not None and good.setdefault(b, True)))
                and type(sp) is int and 0 <= sp <= 65535
                and type(dp) is int and 0 <= dp <= 65535
                and (dp == 0 or p != "ICMP")
            ):
                continue
        why = key_problem(k)
        if why is not None:
            problems[i] = why
    return problems


@dataclass
class ApplyPlan:
    """How a checked batch reaches the kernel: each entry with the timeout it gets.

    ``create``: new sessions, every protocol (one ctnetlink create each,
    :func:`.ctbulk.create_sessions`); ``update``: keys that exist with
    the same translation, changed in place so that a live flow never meets
    a moment without its session; ``replace``: the existing sessions
    deleted first because the batch gives their key another translation
    (their new form is in ``create``).
    """

    create: list[tuple[NatSession, int]] = field(default_factory=list)
    update: list[tuple[NatSession, int]] = field(default_factory=list)
    replace: list[NatSession] = field(default_factory=list)


def plan_apply(batch: Sequence[NatSession], existing: dict[SessionKey, NatSession], timeouts: Sequence[int]) -> ApplyPlan:
    """Sort a checked batch (``timeouts[i]`` for ``batch[i]``) into an :class:`ApplyPlan`."""
    plan = ApplyPlan()
    if not existing:
        # Into an empty table (the target of a migration) every entry is a create.
        plan.create = list(zip(batch, timeouts))
        return plan
    for s, t in zip(batch, timeouts):
        old = existing.get(s.key)
        if old is not None and old.public == s.public:
            plan.update.append((s, t))
            continue
        if old is not None:
            plan.replace.append(old)
        plan.create.append((s, t))
    return plan


def held_elsewhere(batch: Sequence[NatSession], taken: dict[tuple[str, str, int, str, int], tuple[str, str, int, str, int]]) -> dict[SessionKey, str]:
    """Entries whose reply tuple a conntrack entry that is not a session already holds.

    ``taken`` maps reply keys to the original tuple of the entry holding
    them (:func:`.cttext.parse_table` collects it).  The kernel would refuse
    such an entry -- or, asked for the address without the port, give it
    another public port: the batch would not be applied "exactly as given".
    """
    problems: dict[SessionKey, str] = {}
    if not taken:
        return problems
    for s in batch:
        holder = taken.get(s.reply_key)
        if holder is not None:
            p, src, sport, dst, dport = holder
            problems[s.key] = (
                f"translated {s.protocol} {s.translated_address}:{s.translated_port} towards "
                f"{s.dst_address}:{s.dst_port} is held by a connection this node does not translate "
                f"({p} {src}:{sport} -> {dst}:{dport})"
            )
    return problems
