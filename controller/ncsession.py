"""A NETCONF session's operations, whatever module the agent serves (a thin layer over ncclient 0.7.1's manager).

:class:`NetconfSession` holds what any NETCONF client does: the capabilities
of the hello, RPCs given as text, get and get-config with a filter,
edit-config, commits (confirmed, persistent), locks, kill-session,
get-schema, netconf-state.  Every ``rpc-error`` surfaces as
:class:`~natmig.controller.ncerrors.NetconfError` and a lost session as
:class:`~natmig.controller.ncerrors.SessionLost`.  Opening a session (SSH,
call home) and what is particular to the nat-session module are
:class:`~natmig.controller.netconf.NodeClient`'s; :func:`tcp_socket` and
:func:`key_fingerprint` are the transport's pieces it uses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Self

from lxml import etree
from ncclient import operations as nc_ops
from ncclient import transport as nc_transport

from ..codec import NETCONF_NS, Codec, default_codec
from ..errors import ControllerError
from .ncerrors import ConnectError, SessionLost, rpc_error
from .ncpatch import RawTextRPC, TextRPC, tap_next_reply, tapped_reply

CANDIDATE_CAPABILITY = "urn:ietf:params:netconf:capability:candidate:1.0"
CONFIRMED_COMMIT_CAPABILITY = "urn:ietf:params:netconf:capability:confirmed-commit:1.1"
MONITORING_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"

@dataclass(frozen=True)
class RawText:
    """A reply kept as text (see :meth:`NetconfSession.get_config_text`)."""

    raw: str
    #: whether its chunks were also handed out as they arrived
    tapped: bool
    #: its size in bytes as it arrived
    received: int
    #: True when only its root element was kept: its content went to the tap alone
    elided: bool


def key_fingerprint(public_key_line: str) -> str:
    """The fingerprint ncclient reports for a host key (MD5 of the key blob, colon-separated hex), from a
    ``TYPE BASE64 [comment]`` line (a ``.pub`` file, or a known_hosts line without its host field)."""
    parts = public_key_line.split()
    if len(parts) < 2:
        raise ControllerError(f"not a public key line: {public_key_line[:60]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (ValueError, binascii.Error) as e:
        raise ControllerError(f"public key {parts[1][:20]}...: not base64 ({e})") from None
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def tcp_socket(host: str, port: int, timeout: float, where: str) -> socket.socket:
    """A connected TCP socket with Nagle's algorithm off.

    ncclient's own socket keeps it on: a small SSH message written while the
    previous one is unacknowledged then waits for the peer's delayed ACK
    (~40 ms).  Measured: opening a session took ~90 ms in most tries and
    ~7 ms in the others; with TCP_NODELAY, ~7 ms each time.
    """
    last: OSError | None = None
    for af, socktype, proto, _, sa in socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM):
        sock = socket.socket(af, socktype, proto)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(sa)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise ConnectError(f"{where}: cannot open a NETCONF session: {last or 'no address'}")


class NetconfSession:
    """A NETCONF session over an ncclient manager; subclasses add how one is opened (see NodeClient.connect)."""

    def __init__(self, mgr: Any, codec: Codec | None = None, name: str = "") -> None:
        self._mgr = mgr
        self.codec = codec or default_codec()
        self.name = name

    def close(self) -> None:
        """Send close-session and drop the connection (idempotent)."""
        if self._mgr.connected:
            try:
                self._mgr.close_session()
            except Exception:  # the session may already be gone; closing must not fail
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- capabilities

    @property
    def session_id(self) -> int:
        """The agent's id of this NETCONF session."""
        return int(self._mgr.session_id)

    @property
    def capabilities(self) -> list[str]:
        """The capability URIs the agent announced in its hello."""
        return list(self._mgr.server_capabilities)

    def module_revision(self, module: str | None = None) -> str | None:
        """The revision of ``module`` (default: nat-session) the agent announced, or None."""
        module = module or self.codec.schema.module
        for uri in self._mgr.server_capabilities:
            if f"module={module}" in uri:
                for part in uri.split("?", 1)[-1].split("&"):
                    if part.startswith("revision="):
                        return part.split("=", 1)[1]
                return ""
        return None

    def check_module(self, revision: str | None = None) -> str:
        """Fail unless the agent speaks nat-session at ``revision`` (default: ours); returns it."""
        want = revision or self.codec.schema.revision
        got = self.module_revision()
        if got is None:
            raise ControllerError(f"{self.name}: the agent does not announce module {self.codec.schema.module}")
        if got != want:
            raise ControllerError(f"{self.name}: the agent has {self.codec.schema.module} revision {got}, expected {want}")
        return got

    def has_candidate(self) -> bool:
        """Whether the agent offers the candidate datastore."""
        return any(c.startswith(CANDIDATE_CAPABILITY) for c in self._mgr.server_capabilities)

    # ----------------------------------------------------------------- reads

    @property
    def connected(self) -> bool:
        """Whether the NETCONF session is still up (False once closed, killed or lost)."""
        return bool(self._mgr.connected)

    def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._mgr.connected:
            # ncclient would queue the request on a dead session and wait out its timeout.
            raise SessionLost(f"{self.name}: {operation}: the NETCONF session is closed")
        try:
            return fn(*args, **kwargs)
        except nc_ops.RPCError as e:
            raise rpc_error(operation, e) from e
        except nc_transport.TransportError as e:
            raise SessionLost(f"{self.name}: {operation}: the NETCONF session ended ({e})") from e
        except nc_ops.TimeoutExpiredError as e:
            # The timeout is named: a whole-table RPC scales with the table, and 30 s is short at 1,000,000.
            raise ControllerError(f"{self.name}: {operation}: no reply in time (the RPC timeout is {self.reply_timeout:g} s; "
                                  f"a larger table needs a longer one) ({e})") from e
        except OSError as e:
            # paramiko's "Socket is closed" when the session died between the connected check and the send
            # (seen in a rollback after a 1,000,000-session move): a lost session, not a traceback.
            raise SessionLost(f"{self.name}: {operation}: the NETCONF session ended ({e})") from e

    def _text(self, operation: str, body: str) -> Any:
        return self._call(operation, self._mgr.execute, TextRPC, body)

    def _get_config(self, source: str, filter_body: str) -> Any:
        if source not in ("running", "candidate"):
            raise ControllerError(f"get-config: source {source!r} is not running or candidate")
        return self._text("get-config", f'<get-config><source><{source}/></source><filter type="subtree">{filter_body}</filter></get-config>').data_ele

    @property
    def reply_timeout(self) -> float:
        """Seconds an RPC waits for its reply (the connect timeout until set)."""
        return float(self._mgr.timeout)

    @reply_timeout.setter
    def reply_timeout(self, seconds: float) -> None:
        self._mgr.timeout = seconds

    def call(self, operation: str, body: str) -> Any:
        """Any RPC given as XML text (the operation element); the <rpc-reply> element."""
        reply = self._text(operation, body)
        return etree.fromstring(reply.xml.encode() if isinstance(reply.xml, str) else reply.xml)

    def get_filtered(self, filter_body: str) -> Any:
        """<get> (config and state) with a subtree filter: the reply's <data> element."""
        return self._text("get", f'<get><filter type="subtree">{filter_body}</filter></get>').data_ele

    def get_config_filtered(self, source: str, filter_body: str) -> Any:
        """<get-config> of ``source`` with a subtree filter: the reply's <data> element."""
        return self._get_config(source, filter_body)

    def get_config_text(self, source: str, filter_body: str, on_chunk: Callable[[bytes], None] | None = None,
                        keep: bool = True) -> RawText:
        """<get-config> of ``source`` with a subtree filter, its reply kept as text (no tree is built unless it is an error).

        With ``on_chunk``, each chunk of the reply is also handed to it as it
        arrives, in the transport's thread, before the reply is complete (an
        agent that streams a large list sends it in many chunks);
        ``RawText.tapped`` says whether it was.  Only the reply to this
        request is tapped: nothing else may be in flight on this session
        meanwhile.  ``keep`` False (with ``on_chunk``): the chunks are the
        reply's only copy, and a long reply's text is its empty root element
        (``RawText.elided``).
        """
        if source not in ("running", "candidate"):
            raise ControllerError(f"get-config: source {source!r} is not running or candidate")
        body = f'<get-config><source><{source}/></source><filter type="subtree">{filter_body}</filter></get-config>'
        tapped = on_chunk is not None and tap_next_reply(self._mgr, on_chunk, keep)
        raw = self._call("get-config", self._mgr.execute, RawTextRPC, body)._raw
        received, elided = tapped_reply(self._mgr) if tapped else (len(raw.encode()), False)
        return RawText(raw, tapped, received, elided)

    def edit_config(self, body: str, target: str = "candidate", default_operation: str | None = None) -> None:
        """<edit-config> of ``target`` with ``body`` (the elements inside <config>), all or nothing."""
        self._edit(f'<config xmlns="{NETCONF_NS}">{body}</config>', target, default_operation)

    # ---------------------------------------------------------------- writes

    def _edit(self, config: str, target: str, default_operation: str | None = None, test_option: str | None = None, error_option: str | None = None) -> None:
        if target not in ("running", "candidate"):
            raise ControllerError(f"edit-config: target {target!r} is not running or candidate")
        params = "".join(
            f"<{name}>{value}</{name}>"
            for name, value in (("default-operation", default_operation), ("test-option", test_option), ("error-option", error_option))
            if value is not None
        )
        self._text("edit-config", f"<edit-config><target><{target}/></target>{params}{config}</edit-config>")

    # ------------------------------------------------------------ monitoring

    def get_monitoring(self, *parts: str) -> Any:
        """The agent's netconf-state (RFC 6022) ``<data>`` element, limited to ``parts`` (e.g. "datastores", "sessions")."""
        inner = "".join(f"<{p}/>" for p in parts)
        return self._text("get", f'<get><filter type="subtree"><netconf-state xmlns="{MONITORING_NS}">{inner}</netconf-state></filter></get>').data_ele

    # ----------------------------------------------- commits, locks, sessions

    def commit(self, confirmed: bool = False, timeout: float | None = None, persist: str | None = None, persist_id: str | None = None) -> None:
        """Apply the candidate to running (all or nothing).

        ``confirmed``: a confirmed commit (RFC 6241 8.4) that the agent rolls
        back by itself unless confirmed within ``timeout`` seconds; with
        ``persist`` it survives this session's end and any session may
        confirm or cancel it by that token.  ``persist_id`` confirms (or, with
        ``confirmed``, extends) a pending persistent confirmed commit.
        """
        kwargs: dict[str, Any] = {}
        if confirmed:
            kwargs["confirmed"] = True
            if timeout is not None:
                kwargs["timeout"] = str(max(1, int(round(timeout))))
            if persist is not None:
                kwargs["persist"] = persist
        if persist_id is not None:
            kwargs["persist_id"] = persist_id
        self._call("commit", self._mgr.commit, **kwargs)

    def cancel_commit(self, persist_id: str | None = None) -> None:
        """Roll back a pending confirmed commit now (RFC 6241 8.4.9)."""
        self._call("cancel-commit", self._mgr.cancel_commit, persist_id=persist_id)

    def has_confirmed_commit(self) -> bool:
        """Whether the agent announces :confirmed-commit:1.1."""
        return CONFIRMED_COMMIT_CAPABILITY in self._mgr.server_capabilities

    def discard(self) -> None:
        """Reset the candidate to running (discard-changes)."""
        self._call("discard-changes", self._mgr.discard_changes)

    def lock(self, target: str = "running") -> None:
        """Lock a datastore for this session (lock-denied NetconfError when another holds it)."""
        self._call("lock", self._mgr.lock, target)

    def unlock(self, target: str = "running") -> None:
        """Release a lock this session holds."""
        self._call("unlock", self._mgr.unlock, target)

    @contextmanager
    def locked(self, target: str = "running") -> Iterator[None]:
        """Hold the lock of ``target`` for the duration of a with-block."""
        self.lock(target)
        try:
            yield
        finally:
            if self._mgr.connected:
                self.unlock(target)

    def kill_session(self, session_id: int) -> None:
        """End another NETCONF session of the agent (releasing its locks)."""
        self._call("kill-session", self._mgr.kill_session, str(session_id))

    def get_schema(self, identifier: str | None = None, version: str | None = None) -> str:
        """The YANG text of a module the agent serves (RFC 6022 get-schema)."""
        identifier = identifier or self.codec.schema.module
        reply = self._call("get-schema", self._mgr.get_schema, identifier, version=version, format="yang")
        return reply.data if isinstance(reply.data, str) else str(reply.data)
