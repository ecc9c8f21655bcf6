"""NETCONF RPC handling: one message in, one reply out, operations dispatched by a table.

This is the XML side of the agent: it parses ``<rpc>`` messages, turns their
parameters into datastore calls, and writes ``<rpc-reply>`` text; every
refusal becomes ``<rpc-error>`` elements with the RFC 6241 error-tag and, where
an entry or leaf is at fault, an error-path.  Session data goes through the
codec; the provider is reached only through :class:`~.datastore.Datastore`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from xml.sax.saxutils import escape

from lxml import etree

from ..codec import NETCONF_NS, Codec, EditEntry
from ..errors import AgentError
from ..gcpause import gc_paused
from ..model import FIELD_NAMES
from ..schema import LeafValueError
from ..statemodel import COMMON_NS
from ..wire.natread import Batches, edit_request, parse_message
from ..wire.natwrite import encode_control, encode_sessions
from ..wire.reply import Streamed, attrs_of, error_reply, reply, reply_head
from ..wire.state import CONTROL, STATISTICS, Wire
from ..wire.xmlbounds import MAX_ELEMENTS, TooManyElements
from .confirmed import DEFAULT_TIMEOUT, parse_timeout
from .datastore import (
    DEFAULT_OPERATIONS,
    ERROR_OPTIONS,
    TEST_OPTIONS,
    Datastore,
    DatastoreError,
    EditRequest,
    Problem,
    refuse,
    select,
)
from . import rangerpc as range_ops
from .nacm import AccessControl
from .monitoring import MONITORING_NS, WITH_DEFAULTS_NS, YANG_LIBRARY_NS, Catalog, SessionRecord, netconf_state
from .notifications import NOTIFICATION_NS, STREAMS, NotificationHub

log = logging.getLogger(__name__)

_NC = f"{{{NETCONF_NS}}}"


class Server(Protocol):
    """What the RPC layer needs from the SSH server (kill-session, notifications, monitoring)."""

    datastore: Datastore
    codec: Codec
    catalog: Catalog
    hub: NotificationHub
    started: float
    #: who may do what (RFC 8341; agent/nacm.py).
    access: AccessControl

    def kill(self, sid: int) -> bool:
        """End session ``sid``; False when there is no such session."""

    def session_records(self) -> list[SessionRecord]:
        """netconf-state records of the open sessions."""


@dataclass
class SessionState:
    """The RPC layer's view of one NETCONF session."""

    record: SessionRecord
    #: called (from a worker thread) to queue a notification to this session.
    deliver: Callable[[bytes], None] = lambda b: None
    closing: bool = False
    subscribed: bool = False
    #: entries of a large edit-config decoded during parsing (see Batches).
    batches: Any = None
    #: called (from the handler's thread) with each piece of a reply sent while
    #: it is still being made (see _stream_sessions); None: replies go whole.
    stream: Callable[[bytes], None] | None = None
    #: the rpc-reply start tag of the request being handled (a streamed reply sends it first).
    reply_head: bytes = b""
    #: the most XML nodes a message's tree may hold at once (see :func:`parse_message`).
    max_elements: int = MAX_ELEMENTS

    @property
    def sid(self) -> int:
        """The session-id."""
        return self.record.session_id

    @property
    def who(self) -> str:
        """``session 3 (natmig@127.0.0.1)``: how the log names this session."""
        return f"session {self.sid} ({self.record.username}@{self.record.source_host})"


# ----------------------------------------------------------------- replies


class StreamBroken(AgentError):
    """A reply failed after part of it was sent: the session must end (no rpc-error can follow data)."""


# ------------------------------------------------------------------ parsing


def text_param(op: Any, name: str, allowed: tuple[str, ...], default: str) -> str:
    el = op.find(_NC + name)
    if el is None:
        return default
    v = (el.text or "").strip()
    if v not in allowed:
        raise refuse("invalid-value", f"{name} {v!r} is not one of {', '.join(allowed)}", type="protocol", info={"bad-element": name})
    return v


def datastore_param(op: Any, name: str, allowed: tuple[str, ...] = ("running", "candidate")) -> str:
    el = op.find(_NC + name)
    if el is None:
        raise refuse("missing-element", f"<{name}> is required", type="protocol", info={"bad-element": name})
    kids = [c for c in el if isinstance(c.tag, str)]
    if len(kids) != 1:
        raise refuse("bad-element", f"<{name}> must name exactly one datastore", type="protocol", info={"bad-element": name})
    q = etree.QName(kids[0])
    if q.namespace != NETCONF_NS or q.localname not in allowed:
        if q.localname == "url":
            raise refuse("operation-not-supported", "the :url capability is not supported", type="protocol", info={"bad-element": "url"})
        raise refuse("invalid-value", f"datastore {q.localname!r} is not one of {', '.join(allowed)}", type="protocol", info={"bad-element": name})
    return q.localname


def check_params(op: Any, allowed: set[str]) -> None:
    """unknown-element for any parameter the operation does not take (RFC 6241 appendix A)."""
    for c in op:
        if not isinstance(c.tag, str):
            continue
        q = etree.QName(c)
        if q.localname not in allowed or q.namespace not in (NETCONF_NS, WITH_DEFAULTS_NS, MONITORING_NS, NOTIFICATION_NS):
            raise refuse("unknown-element", f"<{etree.QName(op).localname}> takes no parameter <{q.localname}>", type="protocol", info={"bad-element": q.localname})


@dataclass
class Selection:
    """A subtree filter, parsed: what each top-level node of the module contributes."""

    everything: bool = True
    #: alternatives of content matches (leaf -> value); None: nat-session not selected.
    sessions: list[dict[str, Any]] | None = None
    #: leaves to return per entry (keys always); None: all of them.
    leaves: set[str] | None = None
    control: bool = False
    statistics: bool = False
    monitoring: set[str] | None = field(default=None)
    monitoring_selected: bool = False
    yang_library: bool = False
    #: natmig-state's containers: nat-control and nat-statistics as the common module names them.
    state_control: bool = False
    state_statistics: bool = False


def parse_filter(codec: Codec, op: Any) -> Selection:
    """The subtree filter of a get/get-config (RFC 6241 6): content-match and selection leaves."""
    flt = op.find(_NC + "filter")
    if flt is None:
        return Selection()
    ftype = flt.get("type", "subtree")
    if ftype != "subtree":
        raise refuse("operation-not-supported", f"filter type {ftype!r}: only subtree filtering is supported (no :xpath capability)", type="protocol", info={"bad-attribute": "type", "bad-element": "filter"})
    sel = Selection(everything=False)
    ns = codec.ns
    specs = codec.schema.leaf
    for top in flt:
        if not isinstance(top.tag, str):
            continue
        q = etree.QName(top)
        if q.namespace == ns and q.localname == codec.schema.list_name:
            match: dict[str, Any] = {}
            chosen: set[str] = set()
            impossible = False
            for leaf in top:
                if not isinstance(leaf.tag, str):
                    continue
                lq = etree.QName(leaf)
                spec = specs.get(lq.localname) if lq.namespace == ns else None
                if spec is None:
                    raise refuse("unknown-element", f"filter names {lq.localname!r}, not a leaf of {codec.schema.list_name}", path=codec.schema.list_name, leaf=lq.localname, type="protocol")
                text = (leaf.text or "").strip()
                if text:
                    try:
                        match[spec.name] = spec.parse(text)
                    except LeafValueError:
                        impossible = True  # a value no entry can hold selects nothing
                else:
                    chosen.add(spec.name)
            if impossible:
                if sel.sessions is None:
                    sel.sessions = []
                continue
            sel.sessions = (sel.sessions or []) + [match]
            if chosen:
                # Selection leaves: return only the keys, the matched and the chosen leaves
                # (with content matches alone, whole entries are returned).
                sel.leaves = (sel.leaves or set()) | chosen | set(match) | set(codec.schema.keys)
        elif q.namespace == ns and q.localname == codec.schema.control_name:
            sel.control = True
        elif q.namespace == ns and q.localname == codec.schema.stats_name:
            sel.statistics = True
        elif q.namespace == MONITORING_NS and q.localname == "netconf-state":
            sel.monitoring_selected = True
            kids = {etree.QName(c).localname for c in top if isinstance(c.tag, str)}
            sel.monitoring = kids or None
        elif q.namespace == YANG_LIBRARY_NS and q.localname == "yang-library":
            sel.yang_library = True
        elif q.namespace == COMMON_NS and q.localname == CONTROL:
            sel.state_control = True
        elif q.namespace == COMMON_NS and q.localname == STATISTICS:
            sel.state_statistics = True
    return sel


#: RFC 6243's modes; trim is this agent's basic mode.
WITH_DEFAULTS_MODES = ("trim", "report-all", "report-all-tagged", "explicit")


def with_defaults(op: Any) -> str:
    """The with-defaults mode a get or get-config asks for (RFC 6243); trim when it asks for none.

    explicit reports what was set; in a live table every leaf holds what the
    kernel or a client set (there is no leaf "absent, so at its default"), so
    it reports what report-all does.
    """
    el = op.find(f"{{{WITH_DEFAULTS_NS}}}with-defaults")
    if el is None:
        return "trim"
    mode = (el.text or "").strip()
    if mode not in WITH_DEFAULTS_MODES:
        raise refuse("invalid-value", f"with-defaults {mode!r}: this agent supports {', '.join(WITH_DEFAULTS_MODES)}", type="protocol", info={"bad-element": "with-defaults"})
    return mode


def _with_defaults(op: Any) -> bool:
    """True when defaults are reported (every mode but trim)."""
    return with_defaults(op) != "trim"


def _read(server: Server, sess: SessionState, op: Any, source: str, state: bool) -> list[bytes]:
    codec = server.codec
    sel = parse_filter(codec, op)
    mode = with_defaults(op)
    report_all, tagged = mode != "trim", mode == "report-all-tagged"
    want_sessions = sel.everything or sel.sessions is not None
    keys = None
    key_names = codec.schema.keys
    if sel.sessions and all(all(k in m for k in key_names) for m in sel.sessions):
        # Every alternative names a whole key: only those entries are needed.
        keys = list(dict.fromkeys(tuple(m[k] for k in key_names) for m in sel.sessions))
    # A subscribed session too: its notifications wait while the reply streams (server._Session holds its outbox).
    if (sess.stream is not None and source == "running" and not state and not report_all
            and not sel.everything and not sel.control and sel.leaves is None
            and sel.sessions is not None and any(not m for m in sel.sessions)):
        # The whole list and nothing else (what a migration reads): sent while it is read.
        return _stream_sessions(server, sess)
    sessions, control = server.datastore.read(source, with_sessions=want_sessions, with_control=sel.everything or sel.control or sel.state_control, keys=keys)
    parts = []
    if want_sessions:
        picked = select(sessions, None if sel.everything else sel.sessions)
        parts.append(encode_sessions(codec, picked, sel.leaves, report_all, tagged))
    if sel.everything or sel.control:
        parts.append(encode_control(codec, control, report_all, tagged))
    if state and (sel.everything or sel.statistics):
        parts.append(codec.encode_statistics_xml(server.datastore.statistics()))
    if state and (sel.everything or sel.monitoring_selected):
        locks = {n: h for n in ("running", "candidate") if (h := server.datastore.lock_holder(n)) is not None}
        parts.append(netconf_state(server.catalog, server.session_records(), locks, server.started, sel.monitoring))
    if state and (sel.everything or sel.yang_library):
        parts.append(server.catalog.yang_library())
    if sel.everything or sel.state_control:
        held = server.datastore.provider.held() if state else None  # state (config false): a <get> only
        parts.append(Wire.control_xml(control["admit-new-sessions"], report_all, tagged, held).encode())
    if state and (sel.everything or sel.state_statistics):
        st = server.datastore.statistics()
        lst = codec.schema
        parts.append(Wire.statistics_xml([(f"{lst.module}:{lst.list_name}", st["sessions"], st["digest"])]).encode())
    return [b"<data>", *parts, b"</data>"]


def _stream_sessions(server: Server, sess: SessionState) -> Streamed:
    """Running's whole nat-session list, each batch sent as soon as the provider has read it.

    A 10k-session table takes the conntrack tool ~55 ms to print; the client
    (a migration forwarding the entries to another node) gets the first
    entries after a fraction of that and works on them meanwhile.  A failure
    before anything is sent is an ordinary rpc-error; after, the session ends
    (:class:`StreamBroken`), since RFC 6241 has no error after data.
    """
    assert sess.stream is not None
    codec = server.codec
    batches = server.datastore.running_entries(codec)
    try:
        first = next(batches, b"")  # a DatastoreError here is an ordinary rpc-error
        sess.stream(sess.reply_head + b"<data>" + first)
        try:
            for batch in batches:
                sess.stream(batch)
        except Exception as e:
            raise StreamBroken(str(e)) from e
    finally:
        batches.close()
    return Streamed([b"</data>"])


# --------------------------------------------------------------- operations


def op_get(server: Server, sess: SessionState, op: Any) -> list[bytes]:
    """<get>: running config and state (nat-statistics, netconf-state)."""
    check_params(op, {"filter", "with-defaults"})
    return _read(server, sess, op, "running", state=True)


def op_get_config(server: Server, sess: SessionState, op: Any) -> list[bytes]:
    """<get-config>: one datastore's configuration, optionally filtered."""
    check_params(op, {"source", "filter", "with-defaults"})
    return _read(server, sess, op, datastore_param(op, "source"), state=False)


def op_edit_config(server: Server, sess: SessionState, op: Any) -> bytes:
    """<edit-config> with every operation, default-operation, test-option and error-option."""
    check_params(op, {"target", "default-operation", "test-option", "error-option", "config", "url"})
    target = datastore_param(op, "target")
    default_op = text_param(op, "default-operation", DEFAULT_OPERATIONS, "merge")
    test_option = text_param(op, "test-option", TEST_OPTIONS, "test-then-set")
    error_option = text_param(op, "error-option", ERROR_OPTIONS, "stop-on-error")
    config = op.find(_NC + "config")
    if config is None:
        if op.find(_NC + "url") is not None:
            raise refuse("operation-not-supported", "the :url capability is not supported", type="protocol", info={"bad-element": "url"})
        raise refuse("missing-element", "<config> is required", type="protocol", info={"bad-element": "config"})
    batches: Batches | None = sess.batches
    sess.batches = None
    if batches is None:
        req = edit_request(server.codec, config)
    else:
        try:
            rest: EditRequest | None = edit_request(server.codec, config)
            problems: list[Problem] = []
        except DatastoreError as e:
            rest, problems = None, e.problems
        req = batches.finish(rest, problems)
    t0 = time.perf_counter()
    n_entries = req.entry_count
    plan = server.datastore.edit(target, req, sess.sid, default_op, test_option, error_option)
    log.info("%s edit-config %s (%s%s): %d entries in request, %d written, %d deleted%s in %.3f s",
             sess.who, target, default_op, ", test-only" if test_option == "test-only" else "", n_entries,
             len(plan.upserts), len(plan.deletes), ", nat-control changed" if plan.control is not None else "", time.perf_counter() - t0)
    return b"<ok/>"


def _config_source(op: Any) -> tuple[str | None, Any]:
    """copy-config's <source>: (datastore name, None) or (None, inline <config>)."""
    src = op.find(_NC + "source")
    if src is None:
        raise refuse("missing-element", "<source> is required", type="protocol", info={"bad-element": "source"})
    inline = src.find(_NC + "config")
    if inline is not None:
        return None, inline
    if src.find(_NC + "url") is not None:
        raise refuse("operation-not-supported", "the :url capability is not supported", type="protocol", info={"bad-element": "url"})
    return datastore_param(op, "source"), None


def _whole(req: EditRequest) -> EditRequest:
    """``req`` as the whole new content: the list emptied before its entries are written, nat-control at its defaults unless given."""
    req.list_operation = "remove"
    req.control = req.control or {}
    req.control_operation = "replace"
    return req


def op_copy_config(server: Server, sess: SessionState, op: Any) -> bytes:
    """<copy-config> (RFC 6241 7.3): the target's whole content replaced by the source's, all or nothing.

    running -> candidate makes the candidate a fresh copy of running.
    candidate -> running, or an inline <config> into either, replaces the whole
    table: on a live NAT, sessions that traffic opened and that are not in
    the source are deleted (it is what copy-config means; commit is the
    operation that applies only what the candidate changed).
    """
    check_params(op, {"target", "source", "with-defaults"})
    target = datastore_param(op, "target")
    source, inline = _config_source(op)
    if source == target:
        raise refuse("invalid-value", f"copy-config of {target} onto itself", type="protocol", info={"bad-element": "source"})
    if source == "running":
        server.datastore.discard(sess.sid)  # the candidate: running's content again
    else:
        if inline is not None:
            req = edit_request(server.codec, inline)
        else:
            sessions, control = server.datastore.read("candidate")
            entries = [EditEntry(None, s.key, {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None}) for s in sessions]
            req = EditRequest(entries=entries, control=control)
        server.datastore.edit(target, _whole(req), sess.sid, "merge")
    log.info("%s copy-config %s -> %s", sess.who, source or "inline config", target)
    return b"<ok/>"


def op_delete_config(server: Server, sess: SessionState, op: Any) -> bytes:
    """<delete-config> (RFC 6241 7.4): the candidate emptied; running cannot be deleted."""
    check_params(op, {"target"})
    target = datastore_param(op, "target")
    if target == "running":
        raise refuse("operation-failed", "running cannot be deleted (RFC 6241 7.4); delete its entries with edit-config", type="protocol", info={"bad-element": "running"})
    server.datastore.edit(target, _whole(EditRequest()), sess.sid, "merge")
    log.info("%s delete-config %s", sess.who, target)
    return b"<ok/>"


def op_lock(server: Server, sess: SessionState, op: Any) -> bytes:
    """<lock> of running or candidate."""
    check_params(op, {"target"})
    name = datastore_param(op, "target")
    server.datastore.lock(name, sess.sid)
    log.info("%s locked %s", sess.who, name)
    return b"<ok/>"


def op_unlock(server: Server, sess: SessionState, op: Any) -> bytes:
    """<unlock> of a datastore this session locked."""
    check_params(op, {"target"})
    name = datastore_param(op, "target")
    server.datastore.unlock(name, sess.sid)
    log.info("%s unlocked %s", sess.who, name)
    return b"<ok/>"


def _string_param(op: Any, name: str) -> str | None:
    """A string parameter's text, exactly as sent (a persist token's spaces count); None when absent."""
    el = op.find(_NC + name)
    return None if el is None else (el.text or "")


def op_commit(server: Server, sess: SessionState, op: Any) -> bytes:
    """<commit>: the candidate's changes onto running, all or nothing; confirmed or confirming (:confirmed-commit:1.1)."""
    check_params(op, {"confirmed", "confirm-timeout", "persist", "persist-id"})
    confirmed = op.find(_NC + "confirmed") is not None
    persist = _string_param(op, "persist")
    persist_id = _string_param(op, "persist-id")
    timeout_text = _string_param(op, "confirm-timeout")
    if not confirmed:
        for name, given in (("confirm-timeout", timeout_text), ("persist", persist)):
            if given is not None:
                # A client sending these means a confirmed commit; committing
                # for good instead would take its safety net away silently.
                raise refuse("invalid-value", f"<{name}> is a parameter of a confirmed commit: it needs <confirmed/>", type="protocol", info={"bad-element": name})
    timeout = DEFAULT_TIMEOUT
    if timeout_text is not None:
        try:
            timeout = parse_timeout(timeout_text)
        except ValueError as e:
            raise refuse("invalid-value", str(e), type="protocol", info={"bad-element": "confirm-timeout"}) from None
    plan = server.datastore.commit(sess.sid, confirmed=confirmed, timeout=timeout, persist=persist, persist_id=persist_id)
    kind = f"confirmed commit ({timeout} s{', persist' if persist is not None else ''})" if confirmed else "commit"
    log.info("%s %s: %d written, %d deleted%s", sess.who, kind, len(plan.upserts), len(plan.deletes),
             ", nat-control changed" if plan.control is not None else "")
    return b"<ok/>"


def op_cancel_commit(server: Server, sess: SessionState, op: Any) -> bytes:
    """<cancel-commit> (:confirmed-commit:1.1): roll the pending confirmed commit back now."""
    check_params(op, {"persist-id"})
    server.datastore.cancel_commit(sess.sid, _string_param(op, "persist-id"))
    log.info("%s cancel-commit", sess.who)
    return b"<ok/>"


def op_discard(server: Server, sess: SessionState, op: Any) -> bytes:
    """<discard-changes>: the candidate back to running."""
    check_params(op, set())
    server.datastore.discard(sess.sid)
    log.info("%s discard-changes", sess.who)
    return b"<ok/>"


def op_validate(server: Server, sess: SessionState, op: Any) -> bytes:
    """<validate> of running, candidate or an inline <config> (the :validate:1.1 capability)."""
    check_params(op, {"source"})
    src = op.find(_NC + "source")
    inline = src.find(_NC + "config") if src is not None else None
    if inline is not None:
        server.datastore.validate(None, edit_request(server.codec, inline))
    else:
        server.datastore.validate(datastore_param(op, "source"))
    return b"<ok/>"


def op_close_session(server: Server, sess: SessionState, op: Any) -> bytes:
    """<close-session>: reply ok, then the server closes the session."""
    sess.closing = True
    return b"<ok/>"


_SESSION_ID = re.compile(r"[0-9]{1,10}")


def op_kill_session(server: Server, sess: SessionState, op: Any) -> bytes:
    """<kill-session>: end another session, releasing its locks."""
    check_params(op, {"session-id"})
    el = op.find(_NC + "session-id")
    if el is None:
        raise refuse("missing-element", "<session-id> is required", type="protocol", info={"bad-element": "session-id"})
    text = (el.text or "").strip()
    # session-id-type is a uint32 >= 1; str.isdigit() would let '²' (int() then
    # fails) and '١' (int() reads 1) through, so only ASCII digits count.
    if not _SESSION_ID.fullmatch(text) or not 1 <= int(text) <= 4294967295:
        raise refuse("invalid-value", f"session-id {text[:40]!r} is not a session number", type="protocol", info={"bad-element": "session-id"})
    sid = int(text)
    if sid == sess.sid:
        raise refuse("invalid-value", "a session cannot kill itself (use close-session)", type="protocol", info={"bad-element": "session-id"})
    if not server.kill(sid):
        raise refuse("invalid-value", f"there is no session {sid}", type="protocol", info={"bad-element": "session-id"})
    log.info("%s killed session %d", sess.who, sid)
    return b"<ok/>"


def op_get_schema(server: Server, sess: SessionState, op: Any) -> bytes:
    """<get-schema> (RFC 6022): the YANG text of a served module."""
    m = f"{{{MONITORING_NS}}}"
    for c in op:
        if isinstance(c.tag, str) and c.tag not in (m + "identifier", m + "version", m + "format"):
            raise refuse("unknown-element", f"<get-schema> takes no parameter <{etree.QName(c).localname}>", type="protocol", info={"bad-element": etree.QName(c).localname})
    ident = op.findtext(m + "identifier")
    if not ident:
        raise refuse("missing-element", "<identifier> is required", type="protocol", info={"bad-element": "identifier"})
    fmt = (op.findtext(m + "format") or "yang").strip()
    if fmt.rpartition(":")[2] != "yang":
        raise refuse("invalid-value", f"format {fmt!r}: only yang is served", type="protocol", info={"bad-element": "format"})
    found = server.catalog.find(ident.strip(), (op.findtext(m + "version") or "").strip() or None)
    if not found:
        raise refuse("invalid-value", f"no schema {ident!r} with that version", type="protocol", info={"bad-element": "identifier"})
    if len(found) > 1:
        raise refuse("operation-failed", f"several versions of {ident!r}; give <version>", type="protocol", app_tag="data-not-unique")
    log.info("%s get-schema %s@%s", sess.who, found[0].identifier, found[0].version)
    return f'<data xmlns="{MONITORING_NS}">{escape(found[0].text)}</data>'.encode()


def _notification_filter(offered: frozenset[tuple[str, str]], flt: Any) -> frozenset[tuple[str, str]] | None:
    """A create-subscription's subtree filter (RFC 5277 3.6): which of the notifications the agent sends it selects.

    Only whole notifications are selected (a top-level element, no content
    match): that is what a controller asks, and what the hub can send without
    evaluating each event against a tree.
    """
    if flt is None:
        return None
    if flt.get("type", "subtree") != "subtree":
        raise refuse("operation-not-supported", "only subtree filters are supported (no :xpath capability)", type="protocol",
                     info={"bad-attribute": "type", "bad-element": "filter"})
    named = {n: ns for ns, n in offered}
    chosen = set()
    for c in flt:
        if not isinstance(c.tag, str):
            continue
        q = etree.QName(c)
        if (q.namespace, q.localname) not in offered:
            raise refuse("invalid-value", f"the filter selects <{q.localname}> ({q.namespace}): this agent sends "
                         + ", ".join(f"<{n}> ({ns})" for n, ns in sorted(named.items())), type="protocol", info={"bad-element": "filter"})
        if len(c) or (c.text or "").strip():
            raise refuse("operation-not-supported", f"the filter's <{q.localname}> has content: only whole notifications are selected",
                         type="protocol", info={"bad-element": q.localname})
        chosen.add((q.namespace, q.localname))
    if not chosen:
        raise refuse("invalid-value", "the filter selects no notification", type="protocol", info={"bad-element": "filter"})
    return frozenset(chosen)


def op_create_subscription(server: Server, sess: SessionState, op: Any) -> bytes:
    """<create-subscription> (RFC 5277) on stream NETCONF, without replay."""
    n = f"{{{NOTIFICATION_NS}}}"
    for c in op:
        if not isinstance(c.tag, str):
            continue
        q = etree.QName(c)
        # The filter in the base namespace too: ncclient sends it there (RFC 5277's schema puts it in the notification one).
        if (q.namespace != NOTIFICATION_NS or q.localname not in ("stream", "filter", "startTime", "stopTime")) and c.tag != _NC + "filter":
            raise refuse("unknown-element", f"<create-subscription> takes no parameter <{q.localname}>", type="protocol", info={"bad-element": q.localname})
    stream = (op.findtext(n + "stream") or "NETCONF").strip()
    if stream not in STREAMS:
        raise refuse("invalid-value", f"no stream {stream!r} (streams: {', '.join(STREAMS)})", type="protocol", info={"bad-element": "stream"})
    if op.find(n + "startTime") is not None:
        raise refuse("operation-failed", "replay is not supported (no :replay capability): startTime is not allowed", type="protocol", info={"bad-element": "startTime"})
    if op.find(n + "stopTime") is not None:
        raise refuse("bad-element", "stopTime without startTime", type="protocol", info={"bad-element": "stopTime"})
    flt = op.find(n + "filter")
    select = _notification_filter(server.hub.notifications, flt if flt is not None else op.find(_NC + "filter"))
    if server.hub.subscribed(sess.sid):
        raise refuse("in-use", "this session already has a subscription", type="protocol")
    sess.subscribed = True
    server.hub.subscribe(sess.sid, sess.deliver, select)
    log.info("%s subscribed to stream %s", sess.who, stream)
    return b"<ok/>"


def authorize(server: Server, sess: SessionState, op: Any) -> None:
    """RFC 8341: access-denied for what the session's user may not do; an edit needs write on each module it touches."""
    name = etree.QName(op).localname
    modules: list[str] = []
    if name == "edit-config":
        by_ns = {e.namespace: e.identifier for e in server.catalog.entries}
        config = op.find(_NC + "config")
        if config is not None:
            modules = sorted({by_ns.get(etree.QName(c).namespace or "", etree.QName(c).namespace or "?") for c in config if isinstance(c.tag, str)})
    d = server.access.decide(sess.record.username, name, modules)
    if not d.permitted:
        log.warning("%s: %s denied (%s)", sess.who, name, d.why)
        what = f"<{name}>" + (f" on {', '.join(modules)}" if modules else "")
        raise refuse("access-denied", f"user {sess.record.username!r} may not run {what} ({d.why})", type="protocol" if not modules else "application")


Handler = Callable[[Server, SessionState, Any], "bytes | list[bytes]"]

#: (namespace, operation) -> handler: the whole of what the agent does.
TABLE: dict[tuple[str, str], Handler] = {
    (NETCONF_NS, "get"): op_get,
    (NETCONF_NS, "get-config"): op_get_config,
    (NETCONF_NS, "edit-config"): op_edit_config,
    (NETCONF_NS, "copy-config"): op_copy_config,
    (NETCONF_NS, "delete-config"): op_delete_config,
    (NETCONF_NS, "lock"): op_lock,
    (NETCONF_NS, "unlock"): op_unlock,
    (NETCONF_NS, "commit"): op_commit,
    (NETCONF_NS, "cancel-commit"): op_cancel_commit,
    (NETCONF_NS, "discard-changes"): op_discard,
    (NETCONF_NS, "validate"): op_validate,
    (NETCONF_NS, "close-session"): op_close_session,
    (NETCONF_NS, "kill-session"): op_kill_session,
    (MONITORING_NS, "get-schema"): op_get_schema,
    (NOTIFICATION_NS, "create-subscription"): op_create_subscription,
}


def handle_message(server: Server, sess: SessionState, message: bytes) -> bytes:
    """One framed message in, one rpc-reply out (never raises for bad input)."""
    with gc_paused():
        return _handle(server, sess, message)


def _handle(server: Server, sess: SessionState, message: bytes) -> bytes:
    codec = server.codec
    rec = sess.record
    try:
        root, sess.batches = parse_message(codec, message, sess.max_elements)
    except TooManyElements as e:
        rec.in_bad_rpcs += 1
        rec.out_rpc_errors += 1
        log.warning("%s: message refused: %s", sess.who, e)
        return error_reply(codec, [Problem("too-big", str(e), type="rpc")])
    except etree.XMLSyntaxError as e:
        rec.in_bad_rpcs += 1
        rec.out_rpc_errors += 1
        log.info("%s sent malformed XML: %s", sess.who, e)
        return error_reply(codec, [Problem("malformed-message", f"malformed XML: {e}", type="rpc")])
    if root.tag != _NC + "rpc":
        rec.in_bad_rpcs += 1
        rec.out_rpc_errors += 1
        return error_reply(codec, [Problem("malformed-message", f"expected <rpc> in namespace {NETCONF_NS}, got {root.tag}", type="rpc")])
    attrs = attrs_of(root)
    if root.get("message-id") is None:
        rec.in_bad_rpcs += 1
        rec.out_rpc_errors += 1
        return error_reply(codec, [Problem("missing-attribute", "<rpc> needs a message-id attribute", type="rpc", info={"bad-attribute": "message-id", "bad-element": "rpc"})], attrs)
    ops = [c for c in root if isinstance(c.tag, str)]
    rec.in_rpcs += 1
    try:
        if len(ops) != 1:
            raise refuse("malformed-message", f"<rpc> must hold exactly one operation, found {len(ops)}", type="rpc")
        op = ops[0]
        q = etree.QName(op)
        handler = TABLE.get((q.namespace or "", q.localname))
        if handler is None and q.namespace == codec.ns:
            handler = range_ops.OPERATIONS.get(q.localname)
        if handler is None:
            raise refuse("operation-not-supported", f"operation <{q.localname}> in namespace {q.namespace!r} is not supported", type="protocol", info={"bad-element": q.localname})
        authorize(server, sess, op)
        sess.reply_head = reply_head(attrs)
        return reply(attrs, handler(server, sess, op))
    except StreamBroken:
        rec.out_rpc_errors += 1
        raise  # part of the reply is out: the server ends the session
    except DatastoreError as e:
        rec.out_rpc_errors += 1
        log.info("%s %s refused: %s", sess.who, etree.QName(ops[0]).localname if ops else "rpc", e)
        return error_reply(codec, e.problems, attrs)
    except Exception as e:  # a bug must cost one reply, not the session
        rec.out_rpc_errors += 1
        log.exception("%s: internal error", sess.who)
        return error_reply(codec, [Problem("operation-failed", f"internal error: {type(e).__name__}: {e}")], attrs)
