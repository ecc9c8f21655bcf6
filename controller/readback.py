"""A node as read back now: reachable, admission, session count — what every report prints of it.

Both the migration's report and ``natmig recover`` print a node's state
from here, never from what their code did to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NatmigError
from .nodeproto import STATISTICS, has
from .txn import describe_error


@dataclass
class NodeView:
    """One node as read: reachable, admission, session count (None: not read); ``error`` says why not."""

    name: str
    role: str
    reachable: bool = False
    admits: bool | None = None
    sessions: int | None = None
    error: str = ""

    def words(self, carries: bool) -> str:
        """The node's state in a report line."""
        head = "carries traffic" if carries else "carries no traffic"
        if not self.reachable:
            return f"{head}; state {self.error}"
        adm = "admits new sessions" if self.admits else "REFUSES new sessions"
        return f"{head}; {adm}; holds {self.sessions} sessions"


def read_node(name: str, role: str, node: Any, unreachable: str = "unreachable") -> NodeView:
    """Read ``node``'s admission and session count now; ``unreachable`` is what to say when there is no session to it."""
    if node is None or not node.connected:
        return NodeView(name, role, error=unreachable)
    try:
        admits = node.get_admission()
        # nat-statistics counts without shipping the table; a node without it is read whole.
        count = int(node.get_statistics()["sessions"]) if has(node, STATISTICS) else len(node.get_sessions("running"))
        return NodeView(name, role, True, admits, count)
    except NatmigError as e:
        return NodeView(name, role, error=f"could not be read ({describe_error(e)})")
