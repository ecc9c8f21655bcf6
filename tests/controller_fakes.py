"""In-memory stand-ins for a NAT node's NETCONF client and for the switch (unit tests only).

:class:`FakeNode` keeps the semantics the migration relies on: a candidate
datastore applied all-or-nothing by commit, writable running, admission, and
notifications fed by the provider's own change stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

from natmig.agent.provider import MemoryProvider
from natmig.controller.ncerrors import NetconfError, RpcErrorInfo, SessionLost
from natmig.controller.migrate import WRITABLE_RUNNING
from natmig.controller.txn import CANDIDATE, CONFIRMED_COMMIT
from natmig.model import NatSession, SessionKey

REVISION = "2026-12-03"


def sessions(n: int, public: str = "203.0.113.1", proto: str = "TCP", base_port: int = 20000, first: int | None = None) -> list[NatSession]:
    """``n`` distinct sessions translated to ``public``; ``first`` offsets the inside ports (default: by base_port)."""
    first = base_port - 20000 if first is None else first
    return [
        NatSession(proto, f"10.0.0.{2 + (first + i) // 50000}", 1024 + (first + i) % 50000, "203.0.113.100", 80, public, base_port + i,
                   "ESTABLISHED" if proto == "TCP" else None)
        for i in range(n)
    ]


class FakeSubscription:
    def __init__(self, node: "FakeNode") -> None:
        self.watch = node.provider.watch()
        self.node = node

    def get(self, timeout: float | None = None):
        if self.node.drop_events:
            return None
        ev = self.watch.get(timeout)
        return None if ev is None else (ev.kind, ev.session)

    def drain(self):
        if self.node.drop_events:
            return []
        return [(e.kind, e.session) for e in self.watch.drain()]


@dataclass
class FakeNode:
    """A NodeClient look-alike over a MemoryProvider; ``fail`` maps an operation name to an error to raise."""

    #: none of the optional features (controller/nodeproto.py): the migration's plainest paths
    features: ClassVar[frozenset[str]] = frozenset()

    name: str
    provider: MemoryProvider
    revision: str | None = REVISION
    fail: dict[str, Exception] = field(default_factory=dict)
    hooks: dict[str, Callable[[], None]] = field(default_factory=dict)
    remap: bool = False  # a buggy target that changes every translated port on write
    drop_events: bool = False
    calls: list[str] = field(default_factory=list)
    candidate: list[tuple[str, object]] = field(default_factory=list)
    closed: bool = False
    #: each commit's kind, in order: "confirmed", "confirm" (by persist-id) or "plain"
    commits: list[str] = field(default_factory=list)
    #: what every session to this node shares: datastore locks (name -> holder id) and the pending confirmed commit
    shared: dict = field(default_factory=lambda: {"locks": {}, "pending": None})

    def session(self) -> "FakeNode":
        """Another session to the same node (shares its table, locks and pending commit)."""
        return FakeNode(self.name, self.provider, self.revision, self.fail, self.hooks, self.remap, self.drop_events, shared=self.shared)

    @property
    def connected(self) -> bool:
        return not self.closed

    def _enter(self, op: str) -> None:
        self.calls.append(op)
        if self.closed:
            raise SessionLost(f"{self.name}: closed")
        if op in self.fail:
            raise self.fail[op]
        hook = self.hooks.pop(op, None)
        if hook is not None:
            hook()

    @property
    def capabilities(self) -> list[str]:
        return [WRITABLE_RUNNING, CANDIDATE, CONFIRMED_COMMIT]

    def _refused(self, op: str, tag: str, message: str) -> NetconfError:
        return NetconfError(op, [RpcErrorInfo(tag, "error", "protocol", None, message, None)])

    def lock(self, target: str = "running") -> None:
        self._enter(f"lock:{target}")
        holder = self.shared["locks"].get(target)
        if holder is not None:
            raise self._refused("lock", "lock-denied", f"{target} is locked by session {holder}")
        self.shared["locks"][target] = id(self)

    def unlock(self, target: str = "running") -> None:
        self._enter(f"unlock:{target}")
        if self.shared["locks"].get(target) == id(self):
            del self.shared["locks"][target]

    def close(self) -> None:
        self.closed = True
        for name in [n for n, h in self.shared["locks"].items() if h == id(self)]:
            del self.shared["locks"][name]

    def module_revision(self, module: str | None = None) -> str | None:
        self._enter("hello")
        return self.revision

    def get_sessions(self, source: str = "running") -> list[NatSession]:
        self._enter(f"get-config:{source}")
        return list(self.provider.list().sessions)

    def get_admission(self, source: str = "running") -> bool:
        self._enter("get-admission")
        return self.provider.admission()

    def set_admission(self, admit: bool, target: str = "running") -> None:
        self._enter(f"set-admission:{admit}")
        if target == "running":
            self.provider.set_admission(admit)
        else:
            self.candidate.append(("admit", admit))

    def _fix(self, ss: Iterable[NatSession]) -> list[NatSession]:
        if not self.remap:
            return list(ss)
        from dataclasses import replace
        return [replace(s, translated_port=s.translated_port + 1) for s in ss]

    def edit_sessions(self, sessions: Iterable[NatSession], target: str = "candidate", operation: str | None = "merge") -> None:
        self._enter(f"edit-config:{target}")
        ss = self._fix(sessions)
        if target == "running":
            self._apply([("write", ss)])
        else:
            self.candidate.append(("write", ss))

    def delete_sessions(self, keys: Iterable[SessionKey] | None = None, target: str = "candidate") -> None:
        self._enter(f"delete:{target}")
        ks = None if keys is None else list(keys)
        if target == "running":
            self._apply([("delete", ks)])
        else:
            self.candidate.append(("delete", ks))

    def _apply(self, ops) -> None:
        from natmig.agent.provider import ApplyError
        try:
            for kind, arg in ops:
                if kind == "write":
                    self.provider.apply(arg)
                elif kind == "admit":
                    self.provider.set_admission(arg)
                else:
                    self.provider.delete(arg)
        except ApplyError as e:
            raise NetconfError("edit-config", [RpcErrorInfo("invalid-value", "error", "application", None, str(e), None)]) from e

    def commit(self, confirmed: bool = False, timeout=None, persist=None, persist_id=None) -> None:
        """The candidate onto running; a confirmed commit records its undo until confirmed or cancelled (RFC 6241 8.4)."""
        self._enter("commit")
        self.commits.append("confirmed" if confirmed else ("confirm" if persist_id else "plain"))
        pending = self.shared["pending"]
        if pending is not None and persist_id != pending["token"]:
            raise self._refused("commit", "invalid-value", "a confirmed commit with persist is pending; give its persist-id")
        if pending is None and persist_id is not None:
            raise self._refused("commit", "invalid-value", "no confirmed commit is pending")
        ops, self.candidate = self.candidate, []
        if confirmed:
            before = {s.key: s for s in self.provider.list().sessions}
            undo = pending["undo"] if pending else {"created": set(), "removed": {}, "admit": self.provider.admission()}
            for kind, arg in ops:
                if kind == "write":
                    undo["created"].update(s.key for s in arg if s.key not in before)
                elif kind == "delete":
                    undo["removed"].update({k: before[k] for k in (arg if arg is not None else before) if k in before})
            self._apply(ops)
            self.shared["pending"] = {"token": persist, "undo": undo}
            return
        self._apply(ops)
        self.shared["pending"] = None

    def cancel_commit(self, persist_id=None) -> None:
        self._enter("cancel-commit")
        pending = self.shared["pending"]
        if pending is None:
            raise self._refused("cancel-commit", "invalid-value", "no confirmed commit is pending")
        if persist_id != pending["token"]:
            raise self._refused("cancel-commit", "invalid-value", "the persist-id does not match")
        self.rollback()

    def rollback(self) -> None:
        """What the agent does when a confirmed commit times out."""
        pending, self.shared["pending"] = self.shared["pending"], None
        if pending is None:
            return
        u = pending["undo"]
        self.provider.delete(list(u["created"]))
        if u["removed"]:
            self.provider.apply(list(u["removed"].values()))
        self.provider.set_admission(u["admit"])

    def discard(self) -> None:
        self._enter("discard")
        self.candidate = []

    def subscribe(self) -> FakeSubscription:
        self._enter("subscribe")
        return FakeSubscription(self)



class FakeSteering:
    """The switch: remembers the active NAT and every move; ``fail_to`` names a NAT it refuses."""

    def __init__(self, active: str, fail_to: str | None = None) -> None:
        self._active = active
        self.moves: list[str] = []
        self.fail_to = fail_to

    def point_to(self, nat: str) -> None:
        from natmig.controller.steering import SteeringError
        if nat == self.fail_to:
            raise SteeringError(f"bundle to {nat} refused")
        self.moves.append(nat)
        self._active = nat

    def active(self) -> str | None:
        return self._active
