"""`natmig recover`: read both nodes and the switch, then finish or undo an interrupted migration.

The agents undo by themselves what an interrupted migration left pending
(persistent confirmed commits, see :mod:`.txn`) once its confirm-timeout
passes.  Recovery does it at once, and also what no agent can know by
itself: which node carries traffic.

- Traffic on the **target**: the move happened.  The target's hold is
  confirmed with admission open (finish); the source's freeze is
  cancelled; with retire ``delete``, the source's sessions that the target
  holds with the same mapping are removed from the source.
- Traffic on the **source**: the move did not happen (or was pointed back).
  Whatever is pending on either node is cancelled (the target's
  unconfirmed copy goes, the freeze ends); a copy the target had already
  confirmed (sessions equal to the source's, same mapping) is removed.
- Traffic on **both** (several switches that disagree: a move across
  machines interrupted between two switches): it cannot have been admitted
  yet, so traffic is pointed back to the source, then as above.
- Either way, a node whose admission is still closed afterwards is opened.

Recovery locks both nodes like a migration: it is refused, naming the
holder, while a migration runs.  Every line it prints under "now" is read
back from the nodes and the switch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from ..errors import ControllerError, NatmigError
from ..model import NatSession, SessionKey
from .migcontext import WRITABLE_RUNNING, Endpoint
from .nodeproto import Node
from .readback import NodeView, read_node
from .steering import Steering, SwitchesDisagree
from .txn import Locks, cancel_pending, confirm_admission, describe_error, nothing_pending, persist_token


@dataclass
class RecoveryReport:
    """What recovery found, what it did, and the state read back afterwards."""

    source: str
    target: str
    found_traffic_on: str | None = None
    found: list[NodeView] = field(default_factory=list)
    did: list[str] = field(default_factory=list)
    traffic_on: str | None = None
    now: list[NodeView] = field(default_factory=list)
    ok: bool = False
    error: str | None = None

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(asdict(self), indent=2)

    def text(self) -> str:
        """The report for people."""
        lines = [f"recover {self.source} -> {self.target}"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append("  found:")
        lines.append(f"    traffic on: {self.found_traffic_on or 'unknown'}")
        lines += [f"    {v.name} ({v.role}): {v.words(self.found_traffic_on == v.name)}" for v in self.found]
        lines.append("  did:" if self.did else "  did: nothing")
        lines += [f"    {d}" for d in self.did]
        if self.now:
            lines.append("  now (read back):")
            lines.append(f"    traffic on: {self.traffic_on or 'unknown'}")
            lines += [f"    {v.name} ({v.role}): {v.words(self.traffic_on == v.name)}" for v in self.now]
        lines.append("RESULT: " + (f"consistent: traffic on {self.traffic_on}, and every reachable node admits new sessions"
                                   if self.ok else "NOT consistent; see above"))
        return "\n".join(lines)


def _remove(node: Node, keys: list[SessionKey]) -> None:
    direct = WRITABLE_RUNNING in node.capabilities
    node.delete_sessions(keys, target="running" if direct else "candidate")
    if not direct:
        node.commit()


def _same_mapping(a: list[NatSession], b: list[NatSession]) -> list[SessionKey]:
    """Keys held by both with the same public address and port: a copy of one on the other."""
    m = {s.key: (s.translated_address, s.translated_port) for s in b}
    return [s.key for s in a if m.get(s.key) == (s.translated_address, s.translated_port)]


class Recovery:
    """Recovery of the migration ``source`` -> ``target``; call :meth:`run`."""

    def __init__(self, source: Endpoint, target: Endpoint, steering: Steering, retire: str = "delete") -> None:
        self.source, self.target, self.steering, self.retire = source, target, steering, retire
        self.token = persist_token(source.name, target.name)
        self.report = RecoveryReport(source.name, target.name)
        self.nodes: dict[str, Node | None] = {}
        self.why: dict[str, str] = {}
        self.locks: list[Locks] = []
        #: Why the switches could not name one carrier, when they disagree.
        self.mixed: str | None = None

    def run(self) -> RecoveryReport:
        """Read, act, read back; never raises for a node's or the switch's failure (it is reported)."""
        r = self.report
        try:
            self._open()
            r.found_traffic_on = self._active()
            r.found = self._views()
            self._act()
        except NatmigError as e:
            r.error = str(e)
            if "does not match" in (getattr(e, "message", None) or str(e)):
                r.error += (f" (a confirmed commit of another migration than {self.source.name} -> {self.target.name} is pending: "
                            "run recover with that migration's --from and --to)")
        finally:
            r.traffic_on = self._active()
            r.now = self._views()
            for lock in self.locks:
                if lock.node.connected:
                    lock.release()
            for node in self.nodes.values():
                if node is not None:
                    try:
                        node.close()
                    except Exception:  # noqa: BLE001 - closing a dead session must not hide the outcome
                        pass
        carrier = next((v for v in r.now if v.name == r.traffic_on), None)
        r.ok = (r.error is None and carrier is not None and carrier.reachable and bool(carrier.admits)
                and all(v.admits for v in r.now if v.reachable))
        return r

    def _open(self) -> None:
        for ep in (self.source, self.target):
            try:
                self.nodes[ep.name] = ep.open()
            except NatmigError as e:
                self.nodes[ep.name] = None
                self.why[ep.name] = describe_error(e)
        for ep, role in ((self.source, "source"), (self.target, "target")):
            node = self.nodes[ep.name]
            if node is not None:
                # Refused while a migration (or another writer) holds the node: recovery must not race it.
                self.locks.append(Locks.take(node, role))

    def _active(self) -> str | None:
        try:
            return self.steering.active()
        except SwitchesDisagree as e:
            self.mixed = str(e)
            return None
        except NatmigError as e:
            self.report.did.append(f"switch: could not be read ({describe_error(e)})")
            return None

    def _views(self) -> list[NodeView]:
        return [read_node(ep.name, role, self.nodes.get(ep.name), f"unreachable ({self.why.get(ep.name, 'session lost')})")
                for ep, role in ((self.source, "source"), (self.target, "target"))]

    def _act(self) -> None:
        on = self.report.found_traffic_on
        if on is None and self.mixed:
            # A move across several switches interrupted between two of them:
            # no node carries all the traffic.  It cannot have been admitted
            # yet (admit comes after the whole switch), and the frozen source
            # holds every session: pointing back to it is the safe end.
            self.steering.point_to(self.source.name)
            self.report.did.append(f"switch: {self.mixed} (a move interrupted between switches); traffic pointed back to {self.source.name}")
            on = self.report.found_traffic_on = self._active()
        if on not in (self.source.name, self.target.name):
            raise ControllerError(f"traffic goes through {on or 'no known NAT'}, neither {self.source.name} nor {self.target.name}: "
                                  "nothing to finish or undo between these two")
        carrier = self.source if on == self.source.name else self.target
        other = self.target if carrier is self.source else self.source
        did = self.report.did
        cnode, onode = self.nodes[carrier.name], self.nodes[other.name]
        if cnode is None:
            raise ControllerError(f"{carrier.name} carries traffic but cannot be reached ({self.why.get(carrier.name)}); "
                                  "its agent undoes what is pending by itself once it runs again")
        # The node that carries traffic first: it must admit new sessions.
        if carrier is self.target:
            try:
                confirm_admission(cnode, True, self.token)
                did.append(f"{carrier.name}: carries traffic; its hold confirmed with admission open (the move is finished)")
            except NatmigError as e:
                if not nothing_pending(e):
                    raise
                cnode.discard()
        elif cancel_pending(cnode, self.token):
            did.append(f"{carrier.name}: carries traffic; its pending change (the freeze) cancelled, admission restored")
        if onode is not None:
            if cancel_pending(onode, self.token):
                what = "the unconfirmed copy removed, admission restored" if other is self.target else "the freeze cancelled, admission restored"
                did.append(f"{other.name}: its pending change cancelled ({what})")
        for ep, node in ((carrier, cnode), (other, onode)):
            if node is not None and not node.get_admission():
                node.set_admission(True)
                did.append(f"{ep.name}: admission opened")
        if onode is None:
            did.append(f"{other.name}: unreachable ({self.why.get(other.name)}); its agent undoes what is pending by itself")
            return
        # Sessions left on the node without traffic that the carrier holds with the same mapping.
        if carrier is self.source or self.retire == "delete":
            dup = _same_mapping(onode.get_sessions("running"), cnode.get_sessions("running"))
            if dup:
                _remove(onode, dup)
                why = "a copy left by the interrupted migration" if carrier is self.source else "retired (retire=delete): the target holds them"
                did.append(f"{other.name}: {len(dup)} sessions also held by {carrier.name} with the same mapping removed ({why})")


def recover(source: Endpoint, target: Endpoint, steering: Steering, retire: str = "delete") -> RecoveryReport:
    """Run :class:`Recovery` and return its report."""
    return Recovery(source, target, steering, retire).run()
