"""Everything natmig changes inside ncclient 0.7.1, in one place, guarded by its version.

ncclient is the controller's NETCONF client; four measured bottlenecks of
it are worked around here (the RPC tick, the quadratic receive parser, the
quadratic sends, request trees), by replacing or subclassing internals.
Internals change between releases without notice: on any other version
this module refuses to load, naming the one it was written for, rather
than misbehave.  :mod:`.netconf` (the typed client) uses only what this
module exports.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import ncclient
import paramiko
import ncclient.transport.session as _nc_session
from ncclient import transport as nc_transport
from ncclient.operations.retrieve import GetReply
from ncclient.operations.rpc import RPC
from ncclient.transport.session import NetconfBase

from ..codec import NETCONF_NS
from ..errors import ControllerError
from ..framing import Deframer, FramingError

#: The ncclient release whose internals this module knows.
NCCLIENT_VERSION = "0.7.1"
if getattr(ncclient, "__version__", None) != NCCLIENT_VERSION:
    raise ControllerError(
        f"natmig's NETCONF client adapts ncclient {NCCLIENT_VERSION}'s internals, but ncclient "
        f"{getattr(ncclient, '__version__', '(unknown)')} is installed: install ncclient=={NCCLIENT_VERSION} (pyproject.toml pins it)")

# ncclient's transport thread waits up to TICK seconds in select() before it
# looks at its send queue, so every request sits in the queue for up to TICK
# (0.1 s by default): a ~100 ms floor per RPC that dwarfs the agent's ~2 ms.
# A 1 ms tick makes small RPCs take a few ms; the thread still sleeps in
# select(), so the idle cost is ~1000 cheap wake-ups per second per session.
_nc_session.TICK = 0.001

# AES-GCM first among the ciphers the controller's SSH offers (paramiko
# prefers aes128-ctr with hmac-sha2-256): one pass of an AEAD instead of a
# cipher and a MAC.  A migration moves its table twice through this process
# (in from the source, out to the target); measured moving 35 MB each way
# between paramiko and the agent's asyncssh: 0.39 -> 0.28 s of this side's
# CPU, 0.31 -> 0.23 s of the agent's.  ncclient makes the Transport and
# starts it in one call, so the preference is the class's; an agent without
# GCM still agrees on the next cipher offered.
GCM = "aes128-gcm@openssh.com"
_offered = getattr(paramiko.Transport, "_preferred_ciphers")  # private: getattr, typed the same with or without paramiko's stubs
if GCM in _offered:
    setattr(paramiko.Transport, "_preferred_ciphers", (GCM, *(c for c in _offered if c != GCM)))


#: Bytes per read from the SSH channel (ncclient reads 4 KB at a time).
READ_SIZE = 1 << 18
#: Bytes handed to the SSH channel per send (it takes at most one packet, 32 KB, of them).
WRITE_PIECE = 1 << 16


class Parser:
    """Replaces ncclient's framing parser once the hellos are exchanged.

    ncclient 0.7.1 re-decodes and regex-scans its whole receive buffer on
    every 4 KB read, which is quadratic: a 30 MB get-config reply of 100k
    sessions took ~8 s on the client alone.  This one keeps a position and
    frames each message once (the agent's RFC 6242 decoder).
    """

    def __init__(self, session: Any) -> None:
        self._session = session
        self._deframer = Deframer(max_message=1 << 40)
        self._deframer.chunked = session._base == NetconfBase.BASE_11
        self._deframer.on_chunk = self._chunk
        #: the tap armed for the next message to start, and the one taking the current message
        self._armed: Callable[[bytes], None] | None = None
        self._tap: Callable[[bytes], None] | None = None
        self._keep_armed = True
        #: of the last tapped message: its size in bytes, and whether its body was dropped (see tap_next)
        self.tapped_size = 0
        self.tapped_elided = False

    def tap_next(self, tap: Callable[[bytes], None], keep: bool = True) -> bool:
        """Hand ``tap`` each chunk of the next message that starts, as it arrives (in the transport's thread).

        ``keep`` False: the tap is the message's only reader; the message
        dispatched whole is then its root element alone, emptied (its start
        tag carries the message-id), once the message is longer than
        :data:`KEPT`: a table forwarded as it arrives is never held whole
        here (1,000,000 sessions: a 350 MB reply, held as bytes, text and
        its copies, took the controller to 1.5 GB).
        False when the session's framing has no chunks (base:1.0): the
        caller then gets the message only whole, as usual.
        """
        if not self._deframer.chunked:
            return False
        self._armed, self._keep_armed = tap, keep
        return True

    def _chunk(self, part: bytes, first: bool) -> None:
        if first:
            self._tap, self._armed = self._armed, None
            if self._tap is not None and not self._keep_armed:
                self._deframer.elide = KEPT
        if self._tap is not None:
            self._tap(part)

    def parse(self, data: bytes) -> None:
        self._deframer.feed(data)
        try:
            while (msg := self._deframer.next_message()) is not None:
                if self._tap is not None:
                    self.tapped_size, self.tapped_elided = self._deframer.size, self._deframer.elided > 0
                    if self.tapped_elided:
                        msg = emptied(msg)
                self._tap = None  # a tap takes one message
                self._session._dispatch_message(msg.decode())
        except FramingError as e:
            raise nc_transport.TransportError(f"bad framing from the agent: {e}") from e


#: Bytes of a message a tap reads alone that are still kept, at its start and at its end (see Parser.tap_next).
KEPT = 1 << 16

_ROOT = re.compile(rb"\s*(?:<\?xml[^>]*\?>\s*)?<([\w.:-]+)[^>]*>")


def emptied(msg: bytes) -> bytes:
    """A message's root element without its content: ``<rpc-reply ... message-id="7"></rpc-reply>``."""
    if b"rpc-error" in msg:
        # An error is never emptied away: left as it is (no longer well-formed), its reply fails to parse.
        return msg
    m = _ROOT.match(msg)
    if m is None:
        raise nc_transport.TransportError(f"a reply read as it arrived has no root element at its start: {msg[:80]!r}")
    if m.group(0).endswith(b"/>"):
        return m.group(0)
    return m.group(0) + b"</" + m.group(1) + b">"


class SSHSession(nc_transport.SSHSession):
    """ncclient's SSH session with linear-time sends and receives of large messages."""

    def _transport_read(self) -> bytes:
        return self._channel.recv(READ_SIZE)

    def _transport_write(self, data: bytes) -> int:
        # ncclient slices the unsent rest after every partial send (data = data[n:]),
        # and so does paramiko's sendall: a 35 MB edit-config leaves in ~1100
        # SSH packets of 32 KB, each send copying the whole rest (quadratic:
        # a 100k-entry request took 7.4 s against 2.6 s as four of 25k).
        # Only a piece of at most WRITE_PIECE bytes is copied per send.
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            n = self._channel.send(view[pos:pos + WRITE_PIECE].tobytes())
            if n <= 0:
                raise nc_transport.TransportError("the SSH channel closed while a request was being sent")
            pos += n
        return end


class TextRPC(RPC):
    """An RPC whose operation is given as XML text: no element tree is built on the client.

    ncclient builds requests as lxml trees and re-parents them twice; for a
    100k-entry edit-config that cost more than the agent's whole work.
    """

    REPLY_CLS = GetReply

    def request(self, operation: str) -> Any:
        return self._request(operation)

    def _wrap(self, subele: Any) -> str:
        return f'<rpc xmlns="{NETCONF_NS}" message-id="{self._id}">{subele}</rpc>'

class RawReply(GetReply):
    """A reply kept as text: the element tree is built only when the reply carries an rpc-error.

    A 100k-session reply is a ~35 MB document whose tree alone takes ~0.4 s
    to build; :class:`TableReply` often needs none.
    """

    _parsed: bool  # ncclient's RPCReply sets it; declared for the type checker (ncclient has no hints)

    def parse(self) -> None:
        if self._parsed:
            return
        if "rpc-error" in self._raw:
            super().parse()
            return
        self._data = None
        self._parsed = True


class RawTextRPC(TextRPC):
    """A text RPC whose reply stays text (see :class:`RawReply`)."""

    REPLY_CLS = RawReply




def install_parser(session: Any) -> None:
    """Replace the session's framing parser once the hellos are exchanged (see :class:`Parser`)."""
    session.parser = Parser(session)


def tap_next_reply(mgr: Any, tap: Callable[[bytes], None], keep: bool = True) -> bool:
    """Hand ``tap`` the chunks of the next reply on ``mgr``'s session as they arrive; False when it cannot (see :meth:`Parser.tap_next`)."""
    parser = getattr(mgr._session, "parser", None)
    return isinstance(parser, Parser) and parser.tap_next(tap, keep)


def tapped_reply(mgr: Any) -> tuple[int, bool]:
    """The last tapped reply's size in bytes, and whether only its root element was kept."""
    parser = getattr(mgr._session, "parser", None)
    return (parser.tapped_size, parser.tapped_elided) if isinstance(parser, Parser) else (0, False)
