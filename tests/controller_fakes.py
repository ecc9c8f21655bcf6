"""In-memory stand-ins for a NAT node's NETCONF client and for the switch (unit tests only).

:class:`FakeNode` keeps the semantics the migration relies on: a candidate
datastore applied all-or-nothing by commit, writable running, admission, and
notifications fed by the provider's own change stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from natmig.agent.provider import MemoryProvider
from natmig.controller.netconf import NetconfError, RpcErrorInfo, SessionLost
from natmig.controller.migrate import WRITABLE_RUNNING
from natmig.model import NatSession, SessionKey

REVISION = "2026-11-24"


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
        return [WRITABLE_RUNNING]

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
        self.provider.set_admission(admit)

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
                else:
                    self.provider.delete(arg)
        except ApplyError as e:
            raise NetconfError("edit-config", [RpcErrorInfo("invalid-value", "error", "application", None, str(e), None)]) from e

    def commit(self) -> None:
        self._enter("commit")
        ops, self.candidate = self.candidate, []
        self._apply(ops)

    def discard(self) -> None:
        self._enter("discard")
        self.candidate = []

    def subscribe(self) -> FakeSubscription:
        self._enter("subscribe")
        return FakeSubscription(self)

    def close(self) -> None:
        self.closed = True


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
