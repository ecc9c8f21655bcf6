"""The typed NETCONF client of a NAT node's agent (a thin layer over ncclient 0.7.1).

The controller and the benches talk to agents only through :class:`NodeClient`:
sessions go in and out as :class:`~natmig.model.NatSession` records (the
codec does the XML), and every NETCONF ``rpc-error`` surfaces as
:class:`~.ncerrors.NetconfError`, a :class:`~natmig.errors.ControllerError` carrying the
error's own fields.  What any NETCONF session does (capabilities, RPCs,
get, edit-config, commits, locks) is :class:`~.ncsession.NetconfSession`'s,
which it extends with connecting (SSH, call home), the nat-session module's
reads and writes, and notifications; its errors are in :mod:`.ncerrors`.
This module depends on nothing else in ``controller/`` but those,
``ncpatch`` and ``nodeproto``.

Example::

    with NodeClient.connect("192.0.2.11", 830, "natmig", password="pw",
                            known_hosts="/path/known_hosts") as node:
        node.check_module()
        table = node.get_sessions()
        with node.locked("candidate"):
            node.replace_table(table, target="candidate")
            node.commit()
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, ClassVar, Collection, Iterable, Iterator, Mapping, Self
from xml.sax.saxutils import escape as xml_escape

from lxml import etree
from ncclient import manager as nc_manager
from ncclient import transport as nc_transport

from ..codec import NETCONF_NS, Codec
from ..errors import CodecError, ControllerError
from ..model import NatSession, SessionKey
from ..wire import natedit
from ..wire.natreply import TableReply, slices
from .ncerrors import AuthenticationRefused, ConnectError, HostKeyError, SessionLost
from .ncpatch import RawTextRPC, SSHSession, install_parser
from .ncsession import NetconfSession, tcp_socket
from .nodeproto import ALL_FEATURES

log = logging.getLogger(__name__)

NOTIFICATION_CAPABILITY = "urn:ietf:params:netconf:capability:notification:1.0"


#: The host name a call-home session is checked under (see :meth:`NodeClient.accept`).
CALL_HOME_LABEL = "natmig-call-home"


class Subscription:
    """RFC 5277 notifications of ``nat-session-event``: iterate, or :meth:`get` with a timeout.

    Yields ``(event, session)`` with event "created" or "destroyed".
    """

    def __init__(self, client: "NodeClient") -> None:
        self._client = client

    def get(self, timeout: float | None = None) -> tuple[str, NatSession] | None:
        """The next event, or None when ``timeout`` passes first (None: wait for ever)."""
        n = self._client.take_notification(timeout)
        return None if n is None else self._client.codec.decode_event_xml(n)

    def drain(self) -> list[tuple[str, NatSession]]:
        """Every event already received, without waiting."""
        out = []
        while (n := self._client.take_notification(0)) is not None:
            out.append(self._client.codec.decode_event_xml(n))
        return out

    def __iter__(self) -> Iterator[tuple[str, NatSession]]:
        while True:
            ev = self.get(timeout=1.0)
            if ev is not None:
                yield ev


class NodeClient(NetconfSession):
    """A NETCONF session with one NAT node's agent; use :meth:`connect`."""

    #: every optional feature the NAT migration can use (controller/nodeproto.py)
    features: ClassVar[frozenset[str]] = ALL_FEATURES

    def __init__(self, mgr: Any, codec: Codec | None = None, name: str = "") -> None:
        super().__init__(mgr, codec, name)
        self._subscribed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------- connecting

    @classmethod
    def connect(
        cls,
        host: str,
        port: int = 830,
        username: str = "natmig",
        password: str | None = None,
        key_filename: str | None = None,
        known_hosts: str | None = None,
        hostkey_verify: bool = True,
        timeout: float = 60.0,
        sock: socket.socket | None = None,
        unknown_host_cb: Callable[[str, str], bool] | None = None,
    ) -> Self:
        """Open a NETCONF session over SSH.

        The host key is checked against ``known_hosts`` (an OpenSSH
        known_hosts file; entries for a port other than 22 are written
        ``[host]:port``) and ``~/.ssh/known_hosts``; a key that is unknown or
        different raises :class:`HostKeyError` before any RPC is sent.
        ``hostkey_verify=False`` turns the check off (tests of the agent only).
        Authentication uses ``key_filename`` (a private key) and/or
        ``password``; the SSH agent and default keys are not consulted, so
        what is used is exactly what was passed.
        """
        if password is None and key_filename is None:
            raise ConnectError("connect: give a password or a key_filename")
        handler = nc_manager.make_device_handler(None)
        session = SSHSession(handler)
        where = f"{username}@{host}:{port}"
        try:
            if hostkey_verify and known_hosts:
                session.load_known_hosts(known_hosts)
        except OSError as e:
            raise HostKeyError(f"{where}: cannot read known_hosts file {known_hosts}: {e}") from e
        try:
            extra = {"unknown_host_cb": unknown_host_cb} if unknown_host_cb is not None else {}
            session.connect(
                host, port, timeout=timeout, username=username, password=password,
                key_filename=key_filename, allow_agent=False, look_for_keys=False,
                hostkey_verify=hostkey_verify, sock=sock or tcp_socket(host, port, timeout, where), **extra,
            )
        except nc_transport.SSHUnknownHostError as e:
            raise HostKeyError(
                f"{where}: host key {e.fingerprint} is not the known key of {host} "
                f"(known_hosts: {known_hosts or '~/.ssh/known_hosts'}); refusing to talk to it"
            ) from e
        except nc_transport.AuthenticationError as e:
            # Two files are named "password" (docs/agent.md): say which one this side needs.
            raise AuthenticationRefused(
                f"{where}: authentication refused ({e}); the controller sends the plaintext password of the inventory's "
                "password or password_file, which must be the one set in the agent's hashed --passwords file "
                "(`natmig agent passwd FILE USER`), or a key the agent's --authorized-keys lists") from e
        except (nc_transport.TransportError, OSError) as e:
            if "no acceptable host key" in str(e):
                # paramiko offers only the key types known_hosts holds for this
                # host; an agent whose key is of another type is not the known one.
                raise HostKeyError(f"{where}: the agent's host key is not of the type known_hosts holds for {host} ({e}); refusing to talk to it") from e
            raise ConnectError(f"{where}: cannot open a NETCONF session: {e}") from e
        finally:
            if not session.connected and session.transport:
                session.close()
        install_parser(session)
        mgr = nc_manager.Manager(session, handler, timeout=timeout)
        mgr.huge_tree = True  # a 100k-session reply is one 30 MB document
        log.info("NETCONF session %s with %s", mgr.session_id, where)
        return cls(mgr, name=where)

    @classmethod
    def accept(cls, sock: socket.socket, allowed: Mapping[str, str], username: str = "natmig", password: str | None = None,
               key_filename: str | None = None, timeout: float = 60.0) -> Self:
        """A NETCONF session over a call-home connection (RFC 8071): an agent dialled us on ``sock``.

        The agent is known by its host key alone (its address says nothing:
        it may sit behind a NAT): ``allowed`` maps host-key fingerprints
        (:func:`key_fingerprint`) to agent names.  An unknown key is refused
        before this side authenticates, so no credential goes to it.  The
        client's name is the agent's name.
        """
        peer = "%s:%s" % sock.getpeername()[:2]
        found: list[str] = []

        def known(_host: str, fingerprint: str) -> bool:
            name = allowed.get(fingerprint)
            if name is not None:
                found.append(name)
            return name is not None

        # A label no known_hosts file holds: ~/.ssh/known_hosts must not vouch for a call-home peer by its address.
        try:
            client = cls.connect(CALL_HOME_LABEL, 4334, username, password=password, key_filename=key_filename, timeout=timeout,
                                 sock=sock, unknown_host_cb=known)
        except HostKeyError as e:
            raise HostKeyError(f"call home from {peer}: its host key is not in the allow-list; refused ({e})") from e
        client.name = found[0] if found else peer
        return client

    # ------------------------------------------------------ nat-session reads

    def get_sessions(self, source: str = "running", key: SessionKey | None = None) -> list[NatSession]:
        """The nat-session table of ``source`` ("running" or "candidate"); one entry when ``key`` is given."""
        ns = self.codec.ns
        name = self.codec.schema.list_name
        inner = "" if key is None else "".join(f"<{k}>{v}</{k}>" for k, v in zip(self.codec.schema.keys, key))
        return self.codec.decode_xml(self._get_config(source, f'<{name} xmlns="{ns}">{inner}</{name}>'))

    def read_table(self, source: str = "running", on_chunk: Callable[[bytes], None] | None = None, keep: bool = True) -> TableReply:
        """The whole nat-session list of ``source``, kept as text (see :class:`TableReply`).

        With ``on_chunk``, each chunk of the reply is also handed to it as it
        arrives, in the transport's thread, before the reply is complete (an
        agent that streams its table sends it in many chunks); returns
        ``TableReply.tapped`` True then.  Only the reply to this request is
        tapped: nothing else may be in flight on this session meanwhile.
        ``keep`` False (with ``on_chunk``): the chunks are the table's only
        copy; a long reply is then not kept (``TableReply.elided``: its
        text is the reply's empty root element), and ``received`` says how
        many bytes it had.
        """
        text = self.get_config_text(source, f'<{self.codec.schema.list_name} xmlns="{self.codec.ns}"/>', on_chunk, keep)
        reply = TableReply(text.raw, self.codec)
        reply.tapped = text.tapped
        if text.tapped:
            reply.received, reply.elided = text.received, text.elided
        return reply

    def session_chunks(self, source: str = "running", size: int = 25_000, pieces: int = 1) -> Iterator[list[NatSession]]:
        """The whole table of ``source``, read now, then decoded at most ``size`` entries at a time.

        With ``pieces`` > 1 a smaller table is cut into that many slices too
        (so that writing one overlaps decoding the next).

        The reply is fetched before this returns; the decoding (the codec's,
        every leaf validated) happens as the result is iterated, so a caller
        can write one slice elsewhere while the next is decoded.  A reply
        that is not a plain sequence of entries inside ``<data>`` is decoded
        whole, as :meth:`get_sessions` does, and handed out in slices.
        """
        if source not in ("running", "candidate"):
            raise ControllerError(f"get-config: source {source!r} is not running or candidate")
        if size < 1:
            raise ControllerError(f"session_chunks: size {size} must be at least 1")
        ns = self.codec.ns
        name = self.codec.schema.list_name
        body = f'<get-config><source><{source}/></source><filter type="subtree"><{name} xmlns="{ns}"/></filter></get-config>'
        return slices(TableReply(self._call("get-config", self._mgr.execute, RawTextRPC, body)._raw, self.codec), size, pieces)

    def get_sessions_and_admission(self, source: str = "running") -> tuple[list[NatSession], bool]:
        """The nat-session table and nat-control/admit-new-sessions of ``source``, in one get-config."""
        ns = self.codec.ns
        data = self._get_config(source, f'<{self.codec.schema.list_name} xmlns="{ns}"/><{self.codec.schema.control_name} xmlns="{ns}"/>')
        values = self.codec.decode_control_xml(data) or {}
        return self.codec.decode_xml(data), bool(values.get("admit-new-sessions", True))

    def get_statistics(self) -> dict[str, Any]:
        """The config-false nat-statistics leaves (via <get>), typed by the module (counts as int, digest as str)."""
        ns = self.codec.ns
        name = self.codec.schema.stats_name
        specs = {s.name: s for s in self.codec.schema.stats_leaves}
        data = self._text("get", f'<get><filter type="subtree"><{name} xmlns="{ns}"/></filter></get>').data_ele
        out: dict[str, Any] = {}
        for cont in data.iter(f"{{{ns}}}{name}"):
            for leaf in cont:
                spec = specs.get(etree.QName(leaf).localname)
                if spec is not None:
                    out[spec.name] = spec.parse(leaf.text or "")
        return out

    def get_range_digests(self) -> dict[int, tuple[int, int]]:
        """get-range-digests: each non-empty key range's (sessions, digest accumulator) on the node's running table."""
        ns = self.codec.ns
        reply = self.call("get-range-digests", f'<get-range-digests xmlns="{ns}"/>')
        out: dict[int, tuple[int, int]] = {}
        tags = [f"{{{ns}}}{leaf}" for leaf in ("id", "sessions", "digest")]
        try:
            # The leaves by a dict of each entry's children: findtext per leaf cost ~11 us each, 2 s for 65,536 ranges.
            for r in reply.iterchildren(f"{{{ns}}}range"):
                leaves = {c.tag: c.text for c in r}
                rid, n, digest = (leaves.get(t) for t in tags)
                if rid is None or n is None or digest is None or len(digest) != 16:
                    raise ValueError(etree.tostring(r, encoding="unicode")[:200])
                out[int(rid)] = (int(n), int(digest, 16))
        except ValueError as e:
            raise ControllerError(f"{self.name}: get-range-digests: a range the module does not allow: {e}") from e
        return out

    def get_range_sessions(self, ranges: Collection[int]) -> list[NatSession]:
        """get-range-sessions: the running table's sessions whose key is in one of ``ranges`` (none asked: none read)."""
        if not ranges:
            return []
        ns = self.codec.ns
        inner = "".join(f"<range>{r}</range>" for r in sorted(set(ranges)))
        reply = self.call("get-range-sessions", f'<get-range-sessions xmlns="{ns}">{inner}</get-range-sessions>')
        if reply.find(f"{{{NETCONF_NS}}}ok") is not None:
            return []
        return self.codec.decode_xml(reply)

    def find_sessions(self, match: dict[str, str], source: str = "running") -> list[NatSession]:
        """The entries of ``source`` whose leaves equal ``match`` (leaf name -> value as text): a subtree content match."""
        ns = self.codec.ns
        name = self.codec.schema.list_name
        inner = "".join(f"<{k}>{xml_escape(v)}</{k}>" for k, v in match.items())
        return self.codec.decode_xml(self._get_config(source, f'<{name} xmlns="{ns}">{inner}</{name}>'))

    def get_admission(self, source: str = "running") -> bool:
        """nat-control/admit-new-sessions of ``source`` (True when absent: the default)."""
        ns = self.codec.ns
        name = self.codec.schema.control_name
        values = self.codec.decode_control_xml(self._get_config(source, f'<{name} xmlns="{ns}"/>')) or {}
        return bool(values.get("admit-new-sessions", True))

    # ----------------------------------------------------- nat-session writes

    def edit_sessions(
        self,
        sessions: Iterable[NatSession],
        target: str = "candidate",
        operation: str | None = "merge",
        default_operation: str | None = None,
        test_option: str | None = None,
        error_option: str | None = None,
    ) -> None:
        """edit-config of nat-session entries, each with ``operation`` (None: default-operation applies).

        The agent applies the whole request or nothing; a refusal raises
        :class:`NetconfError` naming the offending entries.
        """
        try:
            body = natedit.sessions(self.codec, sessions, operation)
        except CodecError as e:
            raise ControllerError(f"edit_sessions: {e}") from e
        self._edit(natedit.config(body), target, default_operation, test_option, error_option)

    def edit_text(self, entries: str, target: str = "candidate") -> None:
        """edit-config (merge) of list entries given as XML text, each carrying its namespace (see :mod:`natmig.wire.nattext`).

        The agent validates every entry, as for :meth:`edit_sessions`; nothing is decoded here.
        """
        self._edit(natedit.config(entries), target)

    def edit_mixed(self, changes: Iterable[tuple[str, NatSession | SessionKey]], target: str = "candidate") -> None:
        """One all-or-nothing edit-config of entries with their own operations.

        ``changes`` holds (operation, session) pairs, or (operation, key) for
        delete and remove; e.g. a catch-up that creates some sessions and
        deletes others in one step.
        """
        try:
            body = natedit.mixed(self.codec, changes)
        except CodecError as e:
            raise ControllerError(f"edit_mixed: {e}") from e
        if body:
            self._edit(natedit.config(body), target)

    def replace_table(self, sessions: Iterable[NatSession], target: str = "candidate") -> None:
        """Make ``target`` hold exactly ``sessions`` (default-operation replace of the whole list)."""
        body = natedit.sessions(self.codec, sessions)
        if not body:
            self.delete_sessions(None, target=target)
            return
        self._edit(natedit.config(body), target, default_operation="replace")

    def delete_sessions(self, keys: Iterable[SessionKey] | None = None, target: str = "candidate") -> None:
        """Remove entries by key (missing ones ignored: nc:operation remove), or every entry when None."""
        body = natedit.removals(self.codec, keys)
        if body:
            self._edit(natedit.config(body), target)

    def set_admission(self, admit: bool, target: str = "running") -> None:
        """Set nat-control/admit-new-sessions (False: the node drops packets of unknown sessions)."""
        self._edit(natedit.config(natedit.admission(self.codec, admit)), target)

    # --------------------------------------------------------- notifications

    def subscribe(self) -> Subscription:
        """create-subscription on stream NETCONF, selecting nat-session-event; those events then queue up in the result."""
        self.create_subscription((self.codec.ns, "nat-session-event"))
        return Subscription(self)

    def create_subscription(self, select: tuple[str, str] | None = None) -> None:
        """create-subscription on stream NETCONF, once per session (RFC 5277); notifications then queue up.

        ``select`` (namespace, name): a subtree filter that selects that notification only (an agent
        may send the same event in two forms: the NAT's nat-session-event and natmig-state's state-change).
        """
        if not any(c.startswith(NOTIFICATION_CAPABILITY) for c in self._mgr.server_capabilities):
            raise ControllerError(f"{self.name}: the agent does not offer notifications")
        flt = None if select is None else ("subtree", f'<{select[1]} xmlns="{select[0]}"/>')
        with self._lock:
            if not self._subscribed:
                self._call("create-subscription", self._mgr.create_subscription, filter=flt)
                self._subscribed = True

    def drop_notifications(self) -> int:
        """Discard the notifications received so far; how many."""
        n = 0
        while self._mgr.take_notification(block=False) is not None:
            n += 1
        return n

    def take_notification(self, timeout: float | None = None) -> Any:
        """The next notification's element, or None when ``timeout`` passes first (0: only what has arrived; None: wait)."""
        n = self._mgr.take_notification(block=timeout != 0, timeout=timeout or None)
        if n is None:
            if not self._mgr.connected:
                raise SessionLost("notification stream ended: the NETCONF session is closed")
            return None
        return n.notification_ele
