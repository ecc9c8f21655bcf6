"""The SSH side of the agent: asyncssh with the ``netconf`` subsystem (RFC 6242).

Each SSH channel that asks for the ``netconf`` subsystem becomes one NETCONF
session: hello exchange (choosing base:1.0 or base:1.1 framing), then one
RPC at a time handed to :mod:`.rpc` in a worker thread, so a large
get-config of one session never stops the event loop that serves the others.
A session that breaks (a client vanishing mid-message, a framing error, an
oversized message, idle timeout) is closed alone and its locks released.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncssh
from lxml import etree

from ..codec import NETCONF_NS, Codec
from ..errors import AgentError
from . import nacm
from .auth import Authenticator, load_or_create_host_key
from .login import Gate, Login
from .confirmed import CAPABILITY as CONFIRMED_COMMIT_CAPABILITY, Journal
from .datastore import Datastore, Problem
from ..framing import EOM, Deframer, FramingError, MessageTooBig, frame
from .monitoring import BASE_10, BASE_11, Catalog, SessionRecord
from .outbox import Outbox
from .notifications import INTERLEAVE_CAPABILITY, NOTIFICATION_CAPABILITY, NotificationHub
from .provider import SessionProvider
from ..wire.reply import error_reply
from .rpc import SessionState, StreamBroken, handle_message
from ..wire.xmlbounds import MAX_ELEMENTS, TooManyElements, count_nodes, strip_leading_space

log = logging.getLogger(__name__)

OPTIONAL_CAPABILITIES = [
    "urn:ietf:params:netconf:capability:writable-running:1.0",
    "urn:ietf:params:netconf:capability:candidate:1.0",
    CONFIRMED_COMMIT_CAPABILITY,
    "urn:ietf:params:netconf:capability:rollback-on-error:1.0",
    "urn:ietf:params:netconf:capability:validate:1.1",
    NOTIFICATION_CAPABILITY,
    INTERLEAVE_CAPABILITY,
    "urn:ietf:params:netconf:capability:with-defaults:1.0?basic-mode=trim&also-supported=report-all,report-all-tagged,explicit",
]
_HELLO_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
_TRIM_AFTER = 8 << 20
#: Bytes a client may send ahead of the agent's reading, per session (the SSH channel's receive window).
RECV_WINDOW = 16 << 20
try:
    _LIBC: Any = ctypes.CDLL(None)
except OSError:  # pragma: no cover - not glibc
    _LIBC = None
_M_ARENA_MAX = -8


def limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc's malloc arenas (call before worker threads start).

    Each worker thread that handles a 100k-session RPC would otherwise get
    its own arena and keep its freed memory: the agent's peak RSS grows with
    the number of threads that ever did big work.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, n)


def _malloc_trim() -> None:
    """Give freed heap back to the system after a big request.

    A 100k-session request frees hundreds of MB of small objects; glibc keeps
    them mapped, so the agent's RSS would stay at its peak for ever.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


@dataclass
class AgentConfig:
    """Where the agent listens, its credentials and its limits."""

    host: str = "127.0.0.1"  # never every address by default: the NAT's public side would answer
    port: int = 830
    host_key: str = "agent_host_key"
    passwords: str | None = None
    authorized_keys: str | None = None
    #: A 100k-session edit-config is ~35 MB. A message is held twice while it
    #: is taken out of the SSH stream: 64 MiB keeps one under ~200 MB of RSS.
    max_message: int = 64 << 20
    #: XML nodes one message's tree may hold at once (rpc.MAX_ELEMENTS: ~60 MB of tree at most).
    max_elements: int = MAX_ELEMENTS
    #: notification bytes waiting for a subscriber that does not read, before it is given up (~13k events).
    notify_backlog: int = 8 << 20
    max_sessions: int = 16
    idle_timeout: float = 1800.0
    hello_timeout: float = 30.0
    #: where a pending confirmed commit's undo is kept across a restart (None: nowhere).
    state_dir: str | None = None
    #: the access-control rules (agent/nacm.py); None: every authenticated user may do everything.
    nacm: str | None = None


def _drop(message: bytes) -> None:
    """Where notifications for a closed session go."""


class _Session:
    """One NETCONF session on one SSH channel."""

    def __init__(self, agent: "Agent", process: asyncssh.SSHServerProcess, sid: int) -> None:
        self.agent = agent
        self.process = process
        self.loop = asyncio.get_running_loop()
        peer = process.get_extra_info("peername") or ("?", 0)
        user = process.get_extra_info("username") or "?"
        self.state = SessionState(SessionRecord(sid, user, str(peer[0]), time.time()), deliver=self._deliver_threadsafe, stream=self._piece_threadsafe,
                                  max_elements=agent.config.max_elements)
        self.deframer = Deframer(agent.config.max_message)
        self.chunked = False
        #: bytes of the current reply already streamed (see _piece_threadsafe)
        self.streamed = 0
        self.outbox = Outbox(self.loop, self._write_notification, self._unsent, agent.config.notify_backlog, self._overflow)
        self.last_input = time.monotonic()
        self.ended = asyncio.Event()

    @property
    def who(self) -> str:
        return self.state.who

    def _write(self, message: bytes) -> None:
        if self.process.is_closing():
            return
        if self.chunked and len(message) > 1 << 16:
            # Header, body, trailer written apart: no framed copy of a 30 MB reply.
            self.process.stdout.write(b"\n#%d\n" % len(message))
            self.process.stdout.write(message)
            self.process.stdout.write(b"\n##\n")
        else:
            self.process.stdout.write(frame(message, self.chunked))

    def _piece_threadsafe(self, piece: bytes) -> None:
        # Called by a handler streaming its reply; callbacks run in call order,
        # and all before the loop sees the handler return (see run()).
        self.loop.call_soon_threadsafe(self._write_piece, piece)

    def _write_piece(self, piece: bytes) -> None:
        """One more piece of the reply being streamed: a chunk of its own, or raw bytes before end-of-message."""
        if self.process.is_closing() or not piece:
            return
        if not self.streamed:
            # A notification written now would land inside the reply's message (RFC 6242 frames are not nested).
            self.outbox.hold()
        self.streamed += len(piece)
        if self.chunked:
            self.process.stdout.write(b"\n#%d\n" % len(piece))
        self.process.stdout.write(piece)

    def _end_streamed(self, last: bytes) -> None:
        """The rest of a streamed reply and the end of the message."""
        self._write_piece(last)
        if not self.process.is_closing():
            self.process.stdout.write(b"\n##\n" if self.chunked else EOM)

    def _deliver_threadsafe(self, message: bytes) -> None:
        self.loop.call_soon_threadsafe(self._deliver, message)

    def _deliver(self, message: bytes) -> None:
        self.outbox.put(message)

    def _write_notification(self, message: bytes) -> None:
        self.state.record.out_notifications += 1
        self._write(message)

    def _unsent(self) -> int:
        return self.process.channel.get_write_buffer_size()

    def _overflow(self, count: int, size: int) -> None:
        log.warning("%s does not read its notifications: %d waiting (%d bytes, --notify-backlog %d); closing the session",
                    self.who, count, size, self.agent.config.notify_backlog)
        self._abort()

    def _abort(self) -> None:
        """End the channel now, dropping what it has not sent: a client that does not read would keep it buffered."""
        self.state.closing = True
        self.process.channel.abort()

    def kill(self) -> None:
        log.info("%s killed", self.who)
        self._abort()

    async def run(self) -> None:
        try:
            self._write(self.agent.catalog.hello(self.state.sid))
            await self._hello()
            while not self.state.closing:
                msg = self.deframer.next_message()
                if msg is None:
                    await self._wait_input()
                    continue
                self.last_input = time.monotonic()
                size = len(msg)
                self.streamed = 0
                try:
                    reply = await self.loop.run_in_executor(None, self.agent.handle, self.state, msg)
                except StreamBroken as e:
                    # Part of the reply is out: no rpc-error can follow it (RFC 6241 puts errors first).
                    log.warning("%s: reply broken off after %d bytes, closing the session: %s", self.who, self.streamed, e)
                    raise _SessionEnd(f"reply broken off after {self.streamed} bytes: {e}") from e
                del msg
                if self.streamed:
                    self._end_streamed(reply)
                    if self.state.subscribed:
                        self.outbox.open()
                else:
                    self._write(reply)
                size += len(reply) + self.streamed
                del reply
                await self.process.stdout.drain()
                self.last_input = time.monotonic()  # idle counts from the reply: a long request is no silence
                if size > _TRIM_AFTER:
                    await self.loop.run_in_executor(None, _malloc_trim)
                if self.state.subscribed and self.outbox.held:
                    self.outbox.open()  # RFC 5277: notifications only after the create-subscription reply
        except MessageTooBig as e:
            log.warning("%s: %s; closing the session", self.who, e)
            # RFC 6241 has no way to resync after an unread message: say why, then close.
            self._write(self.agent.error_reply([Problem("too-big", str(e), type="transport")]))
        except FramingError as e:
            log.warning("%s: framing error, closing: %s", self.who, e)
        except _SessionEnd as e:
            log.info("%s: %s", self.who, e)
        except (asyncssh.Error, ConnectionError, BrokenPipeError) as e:
            log.info("%s: connection lost: %s", self.who, e)
        finally:
            self.agent.hub.unsubscribe(self.state.sid)
            self.agent.datastore.release_session(self.state.sid)
            if not self.process.is_closing():
                self.process.exit(0)
            self._release()
            log.info("%s closed", self.who)

    def _release(self) -> None:
        """Free what the session buffered, now rather than at the next full collection.

        The session and its state refer to each other (the state's callbacks
        are this session's methods): the cycle would keep a half-read 256 MB
        message alive until the cyclic collector ran, which an idle agent
        may not do for a long time (measured: 789 MB kept, 221 MB after
        gc.collect()).
        """
        held = self.deframer.pending
        self.deframer.clear()
        self.outbox.close()
        self.state.deliver = _drop
        self.state.stream = None
        self.state.batches = None
        if held > _TRIM_AFTER:
            # A message read in 256 KB pieces grew on glibc's heap, which keeps
            # freed memory mapped unless asked to trim it.
            self.loop.run_in_executor(None, _malloc_trim)

    async def _wait_input(self) -> None:
        """Read more of the next message; the session ends after --idle-timeout without a request.

        A subscriber's silence is its normal state, but it must still show
        that it is there: notifications it takes count as activity.  Without
        events, it sends a request now and then or is closed like any other,
        so idle subscriptions cannot hold every --max-sessions slot.  The
        timeout runs from the last whole request or its reply: bytes trickling
        in do not count (a message started and never finished held a session
        for ever).
        """
        idle = self.agent.config.idle_timeout
        while True:
            last = max(self.last_input, self.outbox.last_taken) if self.state.subscribed else self.last_input
            left = idle - (time.monotonic() - last)
            if left <= 0:
                raise _SessionEnd(f"idle for {idle:.0f} s, closing")
            try:
                return await self._read_more(left)
            except _Timeout:
                continue

    async def _read_more(self, timeout: float | None, why: str = "") -> None:
        try:
            data = await asyncio.wait_for(self.process.stdin.read(1 << 18), timeout)
        except asyncio.TimeoutError:
            if why:
                raise _SessionEnd(why) from None
            raise _Timeout from None
        if not data:
            if self.deframer.pending:
                raise _SessionEnd(f"client went away in the middle of a message ({self.deframer.pending} bytes unread)")
            raise _SessionEnd("client closed the channel")
        self.deframer.feed(data)

    async def _hello(self) -> None:
        # One deadline for the whole hello: a client trickling a byte every
        # few seconds must not hold a session slot for ever.
        limit = self.agent.config.hello_timeout
        deadline = time.monotonic() + limit
        while (msg := self.deframer.next_message()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _SessionEnd(f"no hello within {limit:.0f} s, closing")
            await self._read_more(left, f"no hello within {limit:.0f} s, closing")
        if (n := count_nodes(msg)) > self.agent.config.max_elements:
            raise _SessionEnd(f"hello refused: {TooManyElements(n, self.agent.config.max_elements)}")
        try:
            root = etree.fromstring(strip_leading_space(msg), _HELLO_PARSER)
        except etree.XMLSyntaxError as e:
            raise _SessionEnd(f"malformed hello: {e}") from None
        if root.tag != f"{{{NETCONF_NS}}}hello":
            raise _SessionEnd(f"expected <hello>, got {root.tag}")
        if root.find(f"{{{NETCONF_NS}}}session-id") is not None:
            raise _SessionEnd("client hello carries a session-id (RFC 6241 8.1): closing")
        caps = {(c.text or "").strip() for c in root.iter(f"{{{NETCONF_NS}}}capability")}
        if BASE_11 in caps:
            self.chunked = True
            self.deframer.chunked = True
        elif BASE_10 not in caps:
            raise _SessionEnd("client hello announces neither base:1.0 nor base:1.1")
        log.info("%s opened: %s authentication, %s framing", self.who,
                 getattr(self.process.get_extra_info("natmig_auth"), "method", "?"),
                 "base:1.1 chunked" if self.chunked else "base:1.0 end-of-message")


class _SessionEnd(Exception):
    """The session ends normally or by policy; the message says why."""


class _Timeout(Exception):
    """No input within the time asked for."""


class Agent:
    """A NETCONF agent over one session provider."""

    def __init__(self, config: AgentConfig, provider: SessionProvider, codec: Codec) -> None:
        self.provider = provider
        self.codec = codec
        self._serve(config, Datastore(provider, codec, Journal(config.state_dir)),
                    Catalog.for_schema(codec.schema, OPTIONAL_CAPABILITIES), NotificationHub(provider, codec))

    def _serve(self, config: AgentConfig, datastore: Any, catalog: Catalog, hub: Any) -> None:
        """What every agent has, whatever it serves: datastores, catalog, notifications, SSH, sessions."""
        self.config = config
        self.datastore = datastore
        self.datastore.describe = self.describe_session
        # A confirmed commit pending when an earlier run stopped does not survive it.
        self.datastore.recover()
        self.catalog = catalog
        self.hub = hub
        self.access = nacm.load(config.nacm) if config.nacm else nacm.OPEN
        self.auth = Authenticator(config.passwords, config.authorized_keys)
        self.gate = Gate(self.auth)
        self.host_key = load_or_create_host_key(config.host_key)
        self.started = time.time()
        self.sessions: dict[int, _Session] = {}
        self._next_sid = 1
        self._server: asyncssh.SSHAcceptor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle(self, state: SessionState, message: bytes) -> bytes:
        """One framed message in, one rpc-reply out (in a worker thread)."""
        return handle_message(self, state, message)

    def error_reply(self, problems: list[Problem]) -> bytes:
        """An rpc-reply of rpc-errors, for a message that cannot be handled at all."""
        return error_reply(self.codec, problems)

    # The rpc layer's view (see rpc.Server).
    def kill(self, sid: int) -> bool:
        """End session ``sid`` (called from a worker thread)."""
        sess = self.sessions.get(sid)
        if sess is None or self.loop is None:
            return False
        sess.state.closing = True  # it handles no further request
        # Released here, before the <ok/> leaves: a client that kills a session
        # to take its lock must get the lock with its very next request, not
        # once the event loop has got round to closing the channel.
        self.hub.unsubscribe(sid)
        self.datastore.release_session(sid)
        self.loop.call_soon_threadsafe(sess.kill)
        return True

    def session_records(self) -> list[SessionRecord]:
        """netconf-state records of the open sessions."""
        return [s.state.record for s in list(self.sessions.values())]

    def describe_session(self, sid: int) -> str:
        """``session 5 (natmig@192.0.2.10, since 08:12:01 UTC)``: how errors name a session (any thread)."""
        sess = self.sessions.get(sid)
        if sess is None:
            return f"session {sid}"
        r = sess.state.record
        return f"session {sid} ({r.username}@{r.source_host}, since {time.strftime('%H:%M:%S', time.gmtime(r.login_time))} UTC)"

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        if process.subsystem != "netconf":
            process.stderr.write(b"this server only offers the netconf subsystem\n")
            process.exit(1)
            return
        if len(self.sessions) >= self.config.max_sessions:
            log.warning("refusing a session from %s: %d sessions open (limit)", process.get_extra_info("peername"), len(self.sessions))
            process.exit(1)
            return
        sid = self._next_sid
        self._next_sid += 1
        sess = _Session(self, process, sid)
        self.sessions[sid] = sess
        try:
            await sess.run()
        finally:
            self.sessions.pop(sid, None)

    def ssh_options(self) -> dict[str, Any]:
        """The SSH server's settings, for the listener and for call home (where the agent dials but is still the SSH server)."""
        return dict(
            server_factory=lambda: Login(self.gate),
            server_host_keys=[self.host_key], process_factory=self._process, encoding=None,
            # A PTY request is granted but no terminal is made (no line editor: nothing is
            # echoed or translated): OpenSSH's ssh asks for one when scrapli-netconf's system
            # transport runs it, and refusing broke that client.
            allow_pty=True, agent_forwarding=False, x11_forwarding=False, line_editor=False,
            keepalive_interval=30, keepalive_count_max=4, login_timeout=30,
            # A client may send the next request while this one is handled
            # (a migration streams a table as several edit-configs): a
            # receive window of a whole slice lets it arrive meanwhile
            # instead of stalling at asyncssh's default 2 MiB.
            window=RECV_WINDOW,
        )

    async def start(self) -> None:
        """Listen (returns once the socket is bound)."""
        self.loop = asyncio.get_running_loop()
        try:
            self._server = await asyncssh.create_server(host=self.config.host, port=self.config.port, **self.ssh_options())
        except OSError as e:
            raise AgentError(f"cannot listen on {self.config.host}:{self.config.port}: {e}") from e
        log.info("NETCONF agent listening on %s:%d (host key %s, %s)", self.config.host, self.config.port,
                 self.config.host_key, self.host_key.get_fingerprint())

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        """Start and serve until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening, end every session, stop the event watch, roll back a pending confirmed commit."""
        self.hub.close()
        for s in list(self.sessions.values()):
            s.kill()
        if self._server is not None:
            self._server.close()
        self.gate.close()
        self.datastore.close()
