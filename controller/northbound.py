"""The controller's northbound: a NETCONF server of its own module, natmig-controller.

It is the agent's server layer (SSH, sessions, framing, hello, get-schema,
yang-library, subscriptions, kill-session) with a handler table of its own:
<get> of the registered agents, the migrate and recover RPCs, and the
agent-up, agent-down and migration-phase notifications.  A controller is
model-driven like the agents it drives: netconf-console2 or any NETCONF
client can list the agents, start a migration and watch it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable
from xml.sax.saxutils import escape

from lxml import etree

from ..agent import rpc
from ..agent.datastore import DatastoreError, Problem, refuse
from ..agent.monitoring import MONITORING_NS, YANG_LIBRARY_NS, Catalog, SchemaEntry, netconf_state
from ..agent.notifications import Fanout
from ..agent.server import Agent, AgentConfig
from ..codec import NETCONF_NS
from ..schema import YANG_DIR
from ..wire.reply import attrs_of, errors_reply, rpc_error
from .enginereport import EngineReport
from . import txn
from .registry import AgentEntry

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

NS = "urn:natmig:yang:natmig-controller"
MODULE = "natmig-controller"
_N = f"{{{NS}}}"
_NC = f"{{{NETCONF_NS}}}"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
CAPABILITIES = [
    "urn:ietf:params:netconf:capability:notification:1.0",
    "urn:ietf:params:netconf:capability:interleave:1.0",
]


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "1970-01-01T00:00:00Z"


def agents_xml(entries: list[AgentEntry]) -> str:
    """The agents container."""
    out = []
    for e in entries:
        tables = "".join(f"<table><name>{escape(n)}</name><entries>{c}</entries><digest>{d}</digest></table>" for n, (c, d) in e.tables.items())
        mods = "".join(f"<module>{escape(m)}</module>" for m in e.modules)
        adm = "" if e.admission is None else f"<admission>{'true' if e.admission else 'false'}</admission>"
        err = f"<error>{escape(e.error)}</error>" if e.error else ""
        out.append(f"<agent><name>{escape(e.name)}</name><up>{'true' if e.up else 'false'}</up><peer>{escape(e.peer)}</peer>"
                   f"<since>{_ts(e.since)}</since><last-seen>{_ts(e.last_seen)}</last-seen>{mods}{adm}{tables}{err}</agent>")
    return f'<agents xmlns="{NS}">{"".join(out)}</agents>'


def result_xml(r: EngineReport) -> bytes:
    """A migrate or recover RPC's output."""
    parts = [f'<ok xmlns="{NS}">{"true" if r.ok else "false"}</ok>', f'<outcome xmlns="{NS}">{r.outcome}</outcome>']
    if r.failed_phase:
        parts.append(f'<failed-phase xmlns="{NS}">{escape(r.failed_phase)}</failed-phase>')
    if r.error:
        parts.append(f'<error xmlns="{NS}">{escape(r.error)}</error>')
    parts.append(f'<report xmlns="{NS}">{escape(r.text())}</report>')
    return "".join(parts).encode()


class _NoData:
    """The northbound has no configuration: datastore locks only (RFC 6241 lets a client lock what it will not edit)."""

    def __init__(self) -> None:
        self.describe: Callable[[int], str] = lambda sid: f"session {sid}"
        self._locks: dict[str, int] = {}
        self._mutex = threading.Lock()

    def lock(self, name: str, sid: int) -> None:
        with self._mutex:
            if name not in ("running", "candidate"):
                raise refuse("invalid-value", f"unknown datastore {name!r}", type="protocol")
            if (h := self._locks.get(name)) is not None:
                raise refuse("lock-denied", f"{name} is locked by {self.describe(h)}", type="protocol", info={"session-id": str(h)})
            self._locks[name] = sid

    def unlock(self, name: str, sid: int) -> None:
        with self._mutex:
            if self._locks.get(name) != sid:
                raise refuse("operation-failed", f"cannot unlock {name}: not locked by this session", type="protocol")
            del self._locks[name]

    def release_session(self, sid: int) -> None:
        with self._mutex:
            for n in [n for n, h in self._locks.items() if h == sid]:
                del self._locks[n]

    def lock_holder(self, name: str) -> int | None:
        return self._locks.get(name)

    def recover(self) -> bool:
        return False

    def close(self) -> None:
        return None


def _leaf(op: Any, name: str, required: bool = True) -> str | None:
    el = op.find(_N + name)
    if el is None or not (el.text or "").strip():
        if required:
            raise refuse("missing-element", f"<{name}> is required", type="protocol", info={"bad-element": name})
        return None
    return el.text.strip()


class Northbound(Agent):
    """The NETCONF server of a controller :class:`~.service.Service`."""

    def __init__(self, config: AgentConfig, service: "Service") -> None:
        self.service = service
        text = (YANG_DIR / f"{MODULE}.yang").read_text()
        own = SchemaEntry(MODULE, "2026-12-03", NS, text)
        hub = Fanout()
        hub.notifications = frozenset((NS, n) for n in ("agent-up", "agent-down", "migration-phase"))
        self._serve(config, _NoData(), Catalog([own], [], CAPABILITIES), hub)
        self.table: dict[tuple[str, str], Callable[..., Any]] = {
            **{k: v for k, v in rpc.TABLE.items() if k[1] in ("lock", "unlock", "close-session", "kill-session", "get-schema", "create-subscription")},
            (NETCONF_NS, "get"): self.op_get,
            (NETCONF_NS, "get-config"): lambda server, sess, op: b"<data/>",
            (NS, "migrate"): self.op_migrate,
            (NS, "recover"): self.op_recover,
        }

    # ---------------------------------------------------------- operations

    def op_get(self, server: Any, sess: rpc.SessionState, op: Any) -> bytes:
        flt = op.find(_NC + "filter")
        tops = None if flt is None else {f"{etree.QName(c).namespace or ''} {etree.QName(c).localname}" for c in flt if isinstance(c.tag, str)}
        parts = []
        if tops is None or f"{NS} agents" in tops:
            parts.append(agents_xml(self.service.registry.entries()).encode())
        if tops is None or f"{MONITORING_NS} netconf-state" in tops:
            locks = {n: h for n in ("running", "candidate") if (h := self.datastore.lock_holder(n)) is not None}
            parts.append(netconf_state(self.catalog, self.session_records(), locks, self.started, None))
        if tops is None or f"{YANG_LIBRARY_NS} yang-library" in tops:
            parts.append(self.catalog.yang_library())
        return b"<data>" + b"".join(parts) + b"</data>"

    def op_migrate(self, server: Any, sess: rpc.SessionState, op: Any) -> bytes:
        source, target = _leaf(op, "source"), _leaf(op, "target")
        retire = _leaf(op, "retire", required=False) or "delete"
        timeout_text = _leaf(op, "confirm-timeout", required=False) or "10"
        low, high = txn.CONFIRM_TIMEOUT_RANGE
        if not timeout_text.isascii() or not timeout_text.isdigit() or not low <= int(timeout_text) <= high:
            raise refuse("invalid-value", f"confirm-timeout {timeout_text!r} is not a number of seconds in {low}..{high}", type="protocol", info={"bad-element": "confirm-timeout"})
        if retire not in ("delete", "keep"):
            raise refuse("invalid-value", f"retire {retire!r} is not delete or keep", type="protocol", info={"bad-element": "retire"})
        assert source is not None and target is not None
        log.info("%s asks for a migration %s -> %s", sess.who, source, target)
        return result_xml(self.service.migrate(source, target, retire, float(timeout_text)))

    def op_recover(self, server: Any, sess: rpc.SessionState, op: Any) -> bytes:
        source, target = _leaf(op, "source"), _leaf(op, "target")
        assert source is not None and target is not None
        return result_xml(self.service.recover(source, target))

    # -------------------------------------------------------------- serving

    def notify(self, name: str, body: str) -> None:
        """Send the natmig-controller notification ``name`` (its element, ``body``) to every subscriber that selected it."""
        self.hub.send(body.encode(), (NS, name))

    def error_reply(self, problems: list[Problem], attrs: str = "") -> bytes:
        return errors_reply([rpc_error(p) for p in problems], attrs)

    def handle(self, state: rpc.SessionState, message: bytes) -> bytes:
        rec = state.record
        try:
            root = etree.fromstring(message, _PARSER)
        except etree.XMLSyntaxError as e:
            rec.in_bad_rpcs += 1
            return self.error_reply([Problem("malformed-message", f"malformed XML: {e}", type="rpc")])
        attrs = attrs_of(root)
        if root.tag != _NC + "rpc" or root.get("message-id") is None:
            rec.in_bad_rpcs += 1
            return self.error_reply([Problem("malformed-message", "expected <rpc> with a message-id", type="rpc")], attrs)
        ops = [c for c in root if isinstance(c.tag, str)]
        rec.in_rpcs += 1
        try:
            if len(ops) != 1:
                raise refuse("malformed-message", f"<rpc> must hold exactly one operation, found {len(ops)}", type="rpc")
            q = etree.QName(ops[0])
            handler = self.table.get((q.namespace or "", q.localname))
            if handler is None:
                raise refuse("operation-not-supported", f"operation <{q.localname}> in namespace {q.namespace!r} is not supported by the controller", type="protocol", info={"bad-element": q.localname})
            rpc.authorize(self, state, ops[0])
            body = handler(self, state, ops[0])
            return b"".join([f'<rpc-reply xmlns="{NETCONF_NS}"{attrs}>'.encode(), body, b"</rpc-reply>"])
        except DatastoreError as e:
            rec.out_rpc_errors += 1
            return self.error_reply(e.problems, attrs)
        except Exception as e:  # noqa: BLE001 - a bug must cost one reply, not the session
            rec.out_rpc_errors += 1
            log.exception("northbound: internal error")
            return self.error_reply([Problem("operation-failed", f"internal error: {type(e).__name__}: {e}")], attrs)
