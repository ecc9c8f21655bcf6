"""A NETCONF agent for any state module (``natmig agent --provider memory --module FILE``), over any state provider.

What the migration engine needs from an agent, and nothing of a network
function: the module's state lists in running and candidate
(:class:`~.statestore.StateStore`), natmig-state's state-control,
state-statistics and state-change, the yang-library and get-schema.  The
SSH server, sessions and the operations that do not touch data (locks,
commit, kill-session, get-schema, subscriptions) are the NAT agent's own:
only get, get-config, edit-config and validate read or write entries, and
those are here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from lxml import etree

from natmig.codec import NETCONF_NS
from natmig.errors import CodecError
from natmig.schema import LeafValueError
from natmig.statemodel import COMMON_NS, Entry, StateList, StateModule, common_module
from natmig.wire.reply import attrs_of, errors_reply, rpc_error
from natmig.wire.state import CHANGE, CONTROL, STATISTICS, Config, Wire

from . import rpc
from .datastore import DEFAULT_OPERATIONS, ERROR_OPTIONS, TEST_OPTIONS, DatastoreError, Problem, problems_of_codec, refuse
from .monitoring import MONITORING_NS, YANG_LIBRARY_NS, Catalog, netconf_state
from .notifications import NOTIFICATION_NS, Fanout
from .server import OPTIONAL_CAPABILITIES, Agent, AgentConfig
from .stateprovider import StateProvider
from .statestore import StateStore

log = logging.getLogger(__name__)

_NC = f"{{{NETCONF_NS}}}"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)


class StateHub(Fanout):
    """state-change notifications of a state agent's running lists."""

    notifications = frozenset({(COMMON_NS, CHANGE)})

    def publish(self, lst: StateList, event: str, entry: Entry) -> None:
        """One entry created or deleted on running (called with the store's lock held: keep it short)."""
        if self._subs:
            self.send(Wire.change_xml(lst, event, entry).encode(), (COMMON_NS, CHANGE))


@dataclass
class _Filter:
    """A subtree filter: per selected list, content-match alternatives (empty dict: every entry)."""

    everything: bool = True
    lists: dict[StateList, list[dict[str, Any]]] = field(default_factory=dict)
    control: bool = False
    statistics: bool = False
    monitoring: set[str] | None = None
    monitoring_selected: bool = False
    yang_library: bool = False


def _filter(wire: Wire, op: Any) -> _Filter:
    flt = op.find(_NC + "filter")
    if flt is None:
        return _Filter()
    if flt.get("type", "subtree") != "subtree":
        raise refuse("operation-not-supported", "only subtree filtering is supported (no :xpath capability)", type="protocol", info={"bad-attribute": "type", "bad-element": "filter"})
    out = _Filter(everything=False)
    by_tag = {f"{{{l.namespace}}}{l.name}": l for l in wire.lists}
    for top in flt:
        if not isinstance(top.tag, str):
            continue
        q = etree.QName(top)
        lst = by_tag.get(top.tag)
        if lst is not None:
            specs = {f"{{{lst.namespace}}}{s.name}": s for s in lst.leaves}
            match: dict[str, Any] = {}
            impossible = False
            for leaf in top:
                if not isinstance(leaf.tag, str):
                    continue
                spec = specs.get(leaf.tag)
                if spec is None:
                    raise refuse("unknown-element", f"filter names {etree.QName(leaf).localname!r}, not a leaf of {lst.name}", path=lst.name, leaf=etree.QName(leaf).localname, type="protocol")
                if (leaf.text or "").strip():
                    try:
                        match[spec.name] = spec.parse(leaf.text.strip())
                    except LeafValueError:
                        impossible = True  # a value no entry can hold selects nothing
            alts = out.lists.setdefault(lst, [])
            if not impossible:
                alts.append(match)
        elif q.namespace == COMMON_NS and q.localname == CONTROL:
            out.control = True
        elif q.namespace == COMMON_NS and q.localname == STATISTICS:
            out.statistics = True
        elif q.namespace == MONITORING_NS and q.localname == "netconf-state":
            out.monitoring_selected = True
            out.monitoring = {etree.QName(c).localname for c in top if isinstance(c.tag, str)} or None
        elif q.namespace == YANG_LIBRARY_NS and q.localname == "yang-library":
            out.yang_library = True
    return out


def _matches(lst: StateList, entry: Entry, alts: list[dict[str, Any]]) -> bool:
    idx = lst.index
    return any(all(entry[idx[k]] == v for k, v in m.items()) for m in alts)


def _read(server: "StateAgent", op: Any, source: str, state: bool) -> bytes:
    f = _filter(server.store.wire, op)
    report_all = rpc.with_defaults(op) != "trim"
    # Only the lists the filter selects are read: admission or statistics alone read no table.
    tables, admit = server.store.read(source, None if f.everything else list(f.lists))
    parts: list[str] = []
    for lst, entries in tables.items():
        if f.everything:
            chosen = list(entries.values())
        elif lst in f.lists:
            chosen = [e for e in entries.values() if _matches(lst, e, f.lists[lst])]
        else:
            continue
        parts.append(Wire.entries_xml(lst, chosen, report_all=report_all))
    if f.everything or f.control:
        # held is state (config false): in a <get> only, from the provider.
        parts.append(Wire.control_xml(admit, report_all, held=server.store.provider.held() if state else None))
    if state and (f.everything or f.statistics):
        parts.append(Wire.statistics_xml(server.store.statistics()))
    out = "<data>" + "".join(parts)
    tail = b""
    if state and (f.everything or f.monitoring_selected):
        locks = {n: h for n in ("running", "candidate") if (h := server.store.lock_holder(n)) is not None}
        tail += netconf_state(server.catalog, server.session_records(), locks, server.started, f.monitoring)
    if state and (f.everything or f.yang_library):
        tail += server.catalog.yang_library()
    return out.encode() + tail + b"</data>"


def op_get(server: "StateAgent", sess: rpc.SessionState, op: Any) -> bytes:
    """<get>: running's state lists and state-control, state-statistics, netconf-state, yang-library."""
    rpc.check_params(op, {"filter", "with-defaults"})
    return _read(server, op, "running", state=True)


def op_get_config(server: "StateAgent", sess: rpc.SessionState, op: Any) -> bytes:
    """<get-config> of running or candidate."""
    rpc.check_params(op, {"source", "filter", "with-defaults"})
    return _read(server, op, rpc.datastore_param(op, "source"), state=False)


def _config(server: "StateAgent", el: Any) -> Config:
    try:
        return server.store.wire.decode(el)
    except CodecError as e:
        raise DatastoreError(problems_of_codec(e)) from None


def op_edit_config(server: "StateAgent", sess: rpc.SessionState, op: Any) -> bytes:
    """<edit-config>: every operation, default-operation and test-option; all or nothing."""
    rpc.check_params(op, {"target", "default-operation", "test-option", "error-option", "config", "url"})
    target = rpc.datastore_param(op, "target")
    default_op = rpc.text_param(op, "default-operation", DEFAULT_OPERATIONS, "merge")
    test_option = rpc.text_param(op, "test-option", TEST_OPTIONS, "test-then-set")
    rpc.text_param(op, "error-option", ERROR_OPTIONS, "stop-on-error")  # every edit is all or nothing
    config = op.find(_NC + "config")
    if config is None:
        raise refuse("missing-element", "<config> is required", type="protocol", info={"bad-element": "config"})
    cfg = _config(server, config)
    server.store.edit(target, cfg, sess.sid, default_op, test_only=test_option == "test-only")
    log.info("%s edit-config %s (%s): %d entries%s", sess.who, target, default_op, len(cfg.edits),
             ", state-control" if cfg.control is not None else "")
    return b"<ok/>"


def op_validate(server: "StateAgent", sess: rpc.SessionState, op: Any) -> bytes:
    """<validate> of running, candidate or an inline <config>."""
    rpc.check_params(op, {"source"})
    src = op.find(_NC + "source")
    inline = src.find(_NC + "config") if src is not None else None
    if inline is not None:
        server.store.validate(None, _config(server, inline))
    else:
        server.store.validate(rpc.datastore_param(op, "source"))
    return b"<ok/>"


#: The NAT agent's table with the data operations replaced by the generic ones.
TABLE: dict[tuple[str, str], Callable[..., Any]] = {
    # copy-config and delete-config are the NAT agent's only, for now.
    **{k: v for k, v in rpc.TABLE.items() if k[1] not in ("copy-config", "delete-config")},
    (NETCONF_NS, "get"): op_get,
    (NETCONF_NS, "get-config"): op_get_config,
    (NETCONF_NS, "edit-config"): op_edit_config,
    (NETCONF_NS, "validate"): op_validate,
}


def _error_path(store: StateStore, pr: Problem) -> tuple[str, str]:
    """(XPath, namespace declarations) of a problem's entry and leaf, when it names one."""
    name, _, rest = pr.path.partition("[")
    lst = next((l for l in store.lists if l.name == name), None)
    if lst is None:
        return "", ""
    p = lst.prefix
    out = f"/{p}:{name}"
    if rest:
        for k, v in zip(lst.keys, rest.rstrip("]").split(" ")):
            if v not in ("?", "None"):
                out += f"[{p}:{k}='{v}']"
    if pr.leaf:
        out += f"/{p}:{pr.leaf}"
    return out, f' xmlns:{p}="{lst.namespace}"'


def error_xml(store: StateStore, pr: Problem) -> str:
    """One rpc-error (RFC 6241 4.3)."""
    path, decl = _error_path(store, pr)
    return rpc_error(pr, path, decl)


class StateAgent(Agent):
    """The agent of one state module (or several over one provider), its running lists in ``provider`` (default: memory)."""

    def __init__(self, config: AgentConfig, module: StateModule | Sequence[StateModule], provider: StateProvider | None = None) -> None:
        self.store = StateStore(module, provider)
        self.modules = self.store.modules
        self.module = self.store.module
        hub = StateHub()
        self.store.on_change = hub.publish
        self._serve(config, self.store, Catalog.for_modules(self.modules, common_module(), OPTIONAL_CAPABILITIES), hub)

    def error_reply(self, problems: list[Problem], attrs: str = "") -> bytes:
        return errors_reply([error_xml(self.store, p) for p in problems], attrs)

    def handle(self, state: rpc.SessionState, message: bytes) -> bytes:
        rec = state.record
        try:
            root = etree.fromstring(message, _PARSER)
        except etree.XMLSyntaxError as e:
            rec.in_bad_rpcs += 1
            rec.out_rpc_errors += 1
            return self.error_reply([Problem("malformed-message", f"malformed XML: {e}", type="rpc")])
        attrs = attrs_of(root)
        if root.tag != _NC + "rpc" or root.get("message-id") is None:
            rec.in_bad_rpcs += 1
            rec.out_rpc_errors += 1
            why = "<rpc> needs a message-id attribute" if root.tag == _NC + "rpc" else f"expected <rpc> in namespace {NETCONF_NS}, got {root.tag}"
            return self.error_reply([Problem("malformed-message" if root.tag != _NC + "rpc" else "missing-attribute", why, type="rpc",
                                             info={} if root.tag != _NC + "rpc" else {"bad-attribute": "message-id", "bad-element": "rpc"})], attrs)
        ops = [c for c in root if isinstance(c.tag, str)]
        rec.in_rpcs += 1
        t0 = time.perf_counter()
        try:
            if len(ops) != 1:
                raise refuse("malformed-message", f"<rpc> must hold exactly one operation, found {len(ops)}", type="rpc")
            q = etree.QName(ops[0])
            handler = TABLE.get((q.namespace or "", q.localname))
            if handler is None:
                raise refuse("operation-not-supported", f"operation <{q.localname}> in namespace {q.namespace!r} is not supported", type="protocol", info={"bad-element": q.localname})
            rpc.authorize(self, state, ops[0])
            state.reply_head = f'<rpc-reply xmlns="{NETCONF_NS}"{attrs}>'.encode()
            body = handler(self, state, ops[0])
            parts = body if isinstance(body, list) else [body]
            return b"".join([state.reply_head, *parts, b"</rpc-reply>"])
        except DatastoreError as e:
            rec.out_rpc_errors += 1
            log.info("%s %s refused: %s", state.who, etree.QName(ops[0]).localname if ops else "rpc", e)
            return self.error_reply(e.problems, attrs)
        except Exception as e:  # a bug must cost one reply, not the session
            rec.out_rpc_errors += 1
            log.exception("%s: internal error", state.who)
            return self.error_reply([Problem("operation-failed", f"internal error: {type(e).__name__}: {e}")], attrs)
        finally:
            log.debug("%s handled in %.3f s", state.who, time.perf_counter() - t0)


__all__ = ["StateAgent", "StateHub", "NOTIFICATION_NS"]
