"""What an operator does to one NAT node by hand: its status, its sessions, admission, load and flush.

Each operation takes an open :class:`~natmig.controller.netconf.NodeClient`
(or anything with its methods), does one thing over NETCONF, and returns what
it read back from the node afterwards, never what it assumes it did;
``natmig node`` (:mod:`.node_cli`) only opens the session and prints.  A
node that another session has locked (a running migration) refuses writes
with ``lock-denied``/``in-use`` naming the holder, and so does this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from ..codec import Codec, default_codec
from ..errors import UsageError
from ..model import NatSession
from ..schema import LeafValueError
from .ncsession import MONITORING_NS

WRITABLE_RUNNING = "urn:ietf:params:netconf:capability:writable-running:1.0"


@dataclass(frozen=True)
class LockHolder:
    """A datastore lock and the NETCONF session that holds it (from netconf-state)."""

    datastore: str
    session_id: int
    username: str = ""
    source_host: str = ""
    login_time: str = ""

    def __str__(self) -> str:
        who = f"{self.username}@{self.source_host}" if self.username else "unknown"
        since = f", logged in {self.login_time}" if self.login_time else ""
        return f"{self.datastore} locked by session {self.session_id} ({who}{since})"


@dataclass
class NodeStatus:
    """One node as read now: what `natmig node NAME status` prints."""

    name: str
    revision: str | None
    sessions: int | None
    untranslated: int | None
    digest: str | None
    admits: bool
    locks: list[LockHolder] = field(default_factory=list)
    netconf_sessions: int | None = None

    def text(self) -> str:
        """The status for people, one fact a line."""
        lines = [
            f"node {self.name}",
            f"  module:        nat-session revision {self.revision or 'NOT announced'}",
            f"  sessions:      {_or_unknown(self.sessions)} translated, {_or_unknown(self.untranslated)} untranslated (not in the list)",
            f"  digest:        {self.digest or 'unknown'}",
            f"  admission:     {'open (admits new sessions)' if self.admits else 'CLOSED (new sessions are held)'}",
        ]
        if self.netconf_sessions is not None:
            lines.append(f"  netconf:       {self.netconf_sessions} session(s) open, this one included")
        lines += [f"  lock:          {h}" for h in self.locks] or ["  locks:         none"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _or_unknown(v: int | None) -> str:
    return "?" if v is None else str(v)


def locks(node: Any) -> tuple[list[LockHolder], int]:
    """The datastore locks held now with their holders, and how many NETCONF sessions are open (netconf-state)."""
    data = node.get_monitoring("datastores", "sessions")
    m = f"{{{MONITORING_NS}}}"
    who: dict[int, dict[str, str]] = {}
    for s in data.iter(f"{m}session"):
        sid = s.findtext(f"{m}session-id")
        if sid is not None and sid.strip().isdigit():
            who[int(sid)] = {k: (s.findtext(f"{m}{k}") or "") for k in ("username", "source-host", "login-time")}
    out = []
    for ds in data.iter(f"{m}datastore"):
        name = (ds.findtext(f"{m}name") or "").strip()
        for lock in ds.iter(f"{m}global-lock"):
            sid = (lock.findtext(f"{m}locked-by-session") or "").strip()
            if sid.isdigit():
                w = who.get(int(sid), {})
                out.append(LockHolder(name, int(sid), w.get("username", ""), w.get("source-host", ""), w.get("login-time", "")))
    return out, len(who)


def status(name: str, node: Any) -> NodeStatus:
    """Read a node's module revision, nat-statistics, admission and locks."""
    stats = node.get_statistics()
    held, open_sessions = locks(node)
    return NodeStatus(
        name=name, revision=node.module_revision(), sessions=stats.get("sessions"), untranslated=stats.get("untranslated"),
        digest=stats.get("digest"), admits=node.get_admission(), locks=held, netconf_sessions=open_sessions,
    )


def parse_filters(items: Iterable[str], codec: Codec | None = None) -> dict[str, str]:
    """``LEAF=VALUE`` strings (``--filter``) checked against the module: leaf name -> value in the module's text form."""
    codec = codec or default_codec()
    specs = codec.schema.leaf
    out: dict[str, str] = {}
    for item in items:
        leaf, sep, value = item.partition("=")
        leaf = leaf.strip().replace("-", "_")
        if not sep or not leaf:
            raise UsageError(f"--filter {item!r}: expected LEAF=VALUE, e.g. protocol=TCP or dst_port=80")
        spec = specs.get(leaf)
        if spec is None:
            raise UsageError(f"--filter {item!r}: {leaf!r} is not a leaf of nat-session (leaves: {', '.join(specs)})")
        try:
            out[spec.name] = spec.text(spec.parse(value.strip()))
        except LeafValueError as e:
            raise UsageError(f"--filter {item!r}: {e}") from e
    return out


def sessions(node: Any, match: dict[str, str] | None = None) -> list[NatSession]:
    """The node's running sessions, only those equal to ``match`` on every leaf it names (the agent filters)."""
    return node.find_sessions(match) if match else node.get_sessions("running")


def format_session(s: NatSession) -> str:
    """One session on one line, in the spirit of ``conntrack -L``."""
    parts = [f"{s.protocol:<4} {s.src_address}:{s.src_port} -> {s.dst_address}:{s.dst_port}",
             f"as {s.translated_address}:{s.translated_port}"]
    if s.tcp_state:
        parts.append(s.tcp_state)
    if s.timeout is not None:
        parts.append(f"timeout={s.timeout}")
    if s.assured:
        parts.append("[ASSURED]")
    if s.mark:
        parts.append(f"mark={s.mark}")
    return " ".join(parts)


def _apply(node: Any, write: Any) -> None:
    """Run ``write(target)`` on running when the agent allows it, else on the candidate and commit (all or nothing)."""
    if WRITABLE_RUNNING in node.capabilities:
        write("running")
        return
    try:
        write("candidate")
        node.commit()
    except Exception:
        node.discard()
        raise


def set_admission(node: Any, admit: bool) -> bool:
    """Open (True) or close nat-control/admit-new-sessions; returns the value read back."""
    _apply(node, lambda target: node.set_admission(admit, target=target))
    return bool(node.get_admission())


def load(node: Any, table: list[NatSession], replace: bool = False) -> int:
    """Write ``table`` into running in one edit (merge; ``replace``: the node then holds exactly it); returns the count read back.

    The agent applies the whole document or nothing and names every entry it refuses.
    """
    if replace:
        _apply(node, lambda target: node.replace_table(table, target=target))
    elif table:
        _apply(node, lambda target: node.edit_sessions(table, target=target, operation="merge"))
    return int(node.get_statistics()["sessions"])


def flush(node: Any) -> tuple[int, int]:
    """Remove every session; returns (sessions before, sessions read back after)."""
    before = int(node.get_statistics()["sessions"])
    _apply(node, lambda target: node.delete_sessions(None, target=target))
    return before, int(node.get_statistics()["sessions"])

