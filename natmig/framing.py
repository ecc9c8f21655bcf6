"""NETCONF message framing over SSH (RFC 6242): end-of-message and chunked.

Both ends use it (the agent's server, the controller's client): the one
home of the byte-level framing.

Every session starts in base:1.0 end-of-message framing (``]]>]]>`` after each
message) for the hello exchange; when both sides announce base:1.1 the
session switches to chunked framing (``\\n#<len>\\n<data>...\\n##\\n``) for every
message after the hellos.  The decoder is incremental: feed it whatever SSH
delivered, take whole messages out; a message larger than ``max_message``
is refused as soon as that is known, without buffering the rest of it.
"""

from __future__ import annotations

from typing import Callable

from .errors import NatmigError

EOM = b"]]>]]>"
MAX_CHUNK = 4294967295  # RFC 6242 4.2: chunk-size is 1..4294967295
_MAX_HEADER = 13  # "\n#" + 10 digits + "\n"
#: Chunks below this size are merged into one buffer while a message is assembled.
_SMALL_CHUNK = 1 << 12
#: Chunks one message may come in: a 35 MB table in 64 KB chunks is ~550; this many
#: chunks cost the reader ~0.2 s of CPU.
MAX_CHUNKS = 1 << 16


class FramingError(NatmigError):
    """The byte stream violates RFC 6242; the session cannot continue."""


class MessageTooBig(FramingError):
    """A message exceeds the agent's configured size limit."""


def frame(message: bytes, chunked: bool) -> bytes:
    """One message, framed for sending (as a single chunk when chunked)."""
    if chunked:
        return b"\n#%d\n%s\n##\n" % (len(message), message) if message else b""
    return message + EOM


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` in one copy, not two (the slice would be a copy of its own: a third 30 MB)."""
    with memoryview(buf) as view:
        return bytes(view[start:end])


class Deframer:
    """Incremental decoder of one direction of a NETCONF session."""

    def __init__(self, max_message: int = 64 << 20, max_chunks: int = MAX_CHUNKS) -> None:
        self.max_message = max_message
        self.chunked = False
        self._buf = bytearray()
        self._scan = 0  # EOM search resumes here, so a big message is scanned once
        self._parts: list[bytes | bytearray] = []  # chunks of the message being assembled (small ones merged)
        self._size = 0
        self._chunks = 0
        #: chunks one message may come in (RFC 6242 sets no bound; the reader's CPU does).
        self.max_chunks = max_chunks
        #: called with each chunk of a message as it arrives, and whether it is
        #: the message's first (chunked framing only): a reader may act on a
        #: large message before its end (a migration forwarding a table).
        self.on_chunk: Callable[[bytes, bool], None] | None = None
        #: for the message being assembled: keep only its first ``elide`` bytes
        #: (whole chunks) and its last ``elide``, dropping the middle, which
        #: still goes to on_chunk.  A reader that consumes a large message as
        #: it arrives then never holds it whole (a migration forwarding a
        #: table of 1,000,000 sessions: 350 MB).  Reset at each message's end.
        self.elide: int | None = None
        #: of the last message returned: bytes dropped from its middle, where
        #: (its first ``cut`` bytes are its head), and its whole size
        self.elided = 0
        self.cut = 0
        self.size = 0
        self._tail = bytearray()

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        self._buf += data

    def next_message(self) -> bytes | None:
        """The next complete message, or None until more bytes arrive."""
        return self._next_chunked() if self.chunked else self._next_eom()

    def _next_eom(self) -> bytes | None:
        i = self._buf.find(EOM, max(0, self._scan - len(EOM) + 1))
        if i < 0:
            self._scan = len(self._buf)
            if len(self._buf) > self.max_message + len(EOM):
                raise MessageTooBig(f"message exceeds {self.max_message} bytes without an end-of-message mark")
            return None
        msg = _copy(self._buf, 0, i)
        # A new buffer, not del: a bytearray keeps its capacity, and after a
        # 30 MB message that would stay allocated for the session's life.
        self._buf = bytearray(self._buf[i + len(EOM) :])
        self._scan = 0
        if len(msg) > self.max_message:
            raise MessageTooBig(f"message of {len(msg)} bytes exceeds the limit of {self.max_message}")
        return msg

    def _next_chunked(self) -> bytes | None:
        buf = self._buf
        while True:
            if len(buf) < 4:
                return None
            if buf[0:2] != b"\n#":
                raise FramingError(f"expected a chunk header '\\n#', got {bytes(buf[:8])!r}")
            if buf[2:4] == b"#\n":
                del buf[:4]
                if not self._parts:
                    raise FramingError("end-of-chunks marker before any chunk")
                msg = b"".join(self._parts)
                self.cut, self.size, self.elided = len(msg), self._size, 0
                if self._tail:
                    tail = self._tail[-self.elide:] if self.elide else self._tail
                    self.elided = self._size - len(msg) - len(tail)
                    msg += tail
                self._parts = []
                self._tail = bytearray()
                self.elide = None
                self._size = 0
                self._chunks = 0
                return msg
            nl = buf.find(b"\n", 2, _MAX_HEADER + 1)
            if nl < 0:
                if len(buf) > _MAX_HEADER:
                    raise FramingError(f"chunk header too long: {bytes(buf[:_MAX_HEADER])!r}")
                return None
            digits = bytes(buf[2:nl])
            if not digits.isdigit() or digits[0:1] == b"0":
                raise FramingError(f"bad chunk size {digits!r}")
            size = int(digits)
            if size > MAX_CHUNK:
                raise FramingError(f"chunk size {size} exceeds {MAX_CHUNK}")
            if self._size + size > self.max_message:
                raise MessageTooBig(f"message exceeds the limit of {self.max_message} bytes")
            end = nl + 1 + size
            if len(buf) < end:
                return None
            self._chunks += 1
            if self._chunks > self.max_chunks:
                # Each chunk costs a pass of this loop (~3 us) on the reader's
                # event loop: 16 MB in 2-byte chunks stalled it for 26 s.
                raise MessageTooBig(f"message in more than {self.max_chunks} chunks")
            first = self._chunks == 1
            part: bytes | None = None
            if self.elide is not None and self._size >= self.elide:
                # The middle of a message its reader takes chunk by chunk: only its last bytes are kept.
                self._tail += buf[nl + 1 : end]
                if len(self._tail) > 2 * self.elide + (1 << 20):
                    self._tail = bytearray(self._tail[-self.elide:])
            elif size >= _SMALL_CHUNK:
                part = _copy(buf, nl + 1, end)
                self._parts.append(part)
            elif self._parts and isinstance(self._parts[-1], bytearray):
                # Small chunks join the one before: a list of millions of tiny
                # bytes objects took ~70 bytes per chunk (16 MB in 2-byte chunks: 1.1 GB).
                self._parts[-1] += buf[nl + 1 : end]
            else:
                self._parts.append(bytearray(buf[nl + 1 : end]))
            self._size += size
            if self.on_chunk is not None:
                self.on_chunk(part if part is not None else _copy(buf, nl + 1, end), first)
            if size > 1 << 16:
                self._buf = buf = bytearray(buf[end:])  # drop the big buffer's capacity
            else:
                del buf[:end]

    def clear(self) -> None:
        """Drop everything buffered (the session is over): its memory goes back at once."""
        self._buf = bytearray()
        self._parts = []
        self._tail = bytearray()
        self.elide = None
        self._size = 0
        self._chunks = 0
        self._scan = 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf) + self._size
