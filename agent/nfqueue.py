"""Holding packets that would create a session while admission is closed, and releasing them to the switch.

While a node's admission is closed its ``natmig`` table marks each packet
that would create a session on the inside, and a permanent xtables rule
(installed by :meth:`.natnode.NatNode.configure`) sends marked packets to an
NFQUEUE: nftables' own ``queue`` statement is not built into this kernel
(``CONFIG_NFT_QUEUE`` unset), the xtables target is.  :class:`Holder` binds
that queue over netfilter netlink and keeps what arrives; when admission
opens it sends every packet back out of the inside interface as an
Ethernet frame addressed to the gateway, and the switch hairpins it to
whichever NAT carries traffic *now* (the steering flows, see
``controller/plan.py``).  A packet held on the source of a migration and
released after the switch is therefore NATed by the target, never by a node
that no longer carries traffic.

Each packet gets its verdict (DROP) as soon as it is read, not at the
release: the copy is whole (copy-packet mode), so nothing is left for the
kernel to keep.  Kept in the kernel, held packets would count against the
queue's own limit (1,024 by default), whose drops nobody here would see,
and each would pin an unconfirmed conntrack entry.  Here the only bound is
:attr:`Holder.limit`, and what it drops is counted and logged.

This module speaks the protocol itself (a few fixed structs), as
:mod:`.ctnetlink` does for conntrack: the encoders and the decoder are pure
functions, tested against hand-built bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from ..errors import ProviderError
from .ctnetlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, SO_RCVBUFFORCE, open_socket, parse_attrs, socket_in

log = logging.getLogger(__name__)

# linux/netfilter/nfnetlink.h, nfnetlink_queue.h
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_HWADDR, NFQA_PAYLOAD = 1, 2, 9, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NF_DROP, NF_ACCEPT = 0, 1
NLMSG_DONE = 3
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5
ETH_P_IP = 0x0800

#: Bytes of each packet copied to us: all of it (an IPv4 packet is at most 65,535).
COPY_RANGE = 0xFFFF
#: Packets a holder keeps at most while admission is closed (per queue).  A held TCP SYN's
#: retransmissions are not kept (:func:`syn_key`), so this is about one packet a connection
#: attempted: 100 new connections a second for 10 minutes; each is ~0.3 KB here.
HOLD_LIMIT = 65536
#: The kernel queue's length: packets wait there only until the reader thread gets them.
KERNEL_QUEUE_MAXLEN = 4096
#: Receive buffer of the netlink socket: a burst of full-size packets while the thread is descheduled.
RCVBUF = 8 << 20
#: A release pauses RELEASE_PAUSE seconds after every RELEASE_BURST packets.  Measured on the
#: testbed's userspace switch, 4,096 held UDP packets released back to back: 1,305 reached the
#: server; pausing 0.5 ms every 64: 3,169 (the release then takes ~32 ms more).  A release of
#: fewer than 64 packets, the usual one (SYNs of new connections), never pauses.
RELEASE_BURST = 64
RELEASE_PAUSE = 0.0005
#: Seconds after a release during which a packet still read from the queue is sent on too: one
#: marked while admission was opening, read a moment later (microseconds, in practice).  Later,
#: admission must have been closed by someone else: such packets are dropped, as with nobody
#: listening, never sent on (back at a closed node they would go round and round).
RELEASE_GRACE = 0.2

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NFGENMSG = struct.Struct("!BBH")  # family, version, resource id (the queue number, big-endian)
_PACKET_HDR = struct.Struct("!IHB")  # packet id, hw protocol, hook (packed, 7 bytes)
_HWADDR = struct.Struct("!HH8s")  # address length, padding, address
_VERDICT = struct.Struct("!II")  # verdict, packet id


class NfqueueError(ProviderError):
    """The queue could not be bound or read; carries the kernel's errno when it refused."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


# -- messages ------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    ln = 4 + len(payload)
    return struct.pack("=HH", ln, kind) + payload + b"\0" * ((4 - ln % 4) % 4)


def message(msg: int, queue: int, attrs: bytes, *, seq: int = 0, flags: int = NLM_F_REQUEST) -> bytes:
    """One nfnetlink message of the queue subsystem: header, nfgenmsg (AF_UNSPEC, queue number), attributes."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSGHDR.pack(16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def bind_message(queue: int, *, seq: int = 1, maxlen: int = KERNEL_QUEUE_MAXLEN) -> bytes:
    """Bind ``queue`` to the sending socket, copying whole packets, the kernel queue ``maxlen`` long (acknowledged)."""
    attrs = (
        _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0))
        + _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
        + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
    )
    return message(NFQNL_MSG_CONFIG, queue, attrs, seq=seq, flags=NLM_F_REQUEST | NLM_F_ACK)


def unbind_message(queue: int, *, seq: int = 2) -> bytes:
    """Release ``queue`` (acknowledged); packets then queued to it are dropped by the kernel."""
    attrs = _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0))
    return message(NFQNL_MSG_CONFIG, queue, attrs, seq=seq, flags=NLM_F_REQUEST | NLM_F_ACK)


def verdict_message(queue: int, packet_id: int, verdict: int = NF_DROP) -> bytes:
    """The verdict on one queued packet (not acknowledged: the kernel answers only an error)."""
    return message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, _VERDICT.pack(verdict, packet_id)))


@dataclass(frozen=True)
class QueuedPacket:
    """One packet the kernel queued: its id (for the verdict), link-layer protocol, hook, sender's MAC, the IP packet."""

    packet_id: int
    hw_protocol: int
    hook: int
    hwaddr: bytes | None
    payload: bytes


@dataclass(frozen=True)
class NetlinkAck:
    """An acknowledgement or error the kernel sent (errno 0: success), for the request numbered ``seq``."""

    seq: int
    errno: int


def parse(data: bytes) -> Iterator[QueuedPacket | NetlinkAck]:
    """The queued packets and acknowledgements in one datagram read from the socket; anything else is skipped."""
    off = 0
    while off + 16 <= len(data):
        ln, typ, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if ln < 16 or off + ln > len(data):
            return  # malformed or cut: stop rather than loop
        if typ == NLMSG_ERROR and ln >= 20:
            (code,) = struct.unpack_from("=i", data, off + 16)
            yield NetlinkAck(seq, -code)
        elif typ == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            attrs = parse_attrs(data, off + 20, off + ln)  # after nlmsghdr and nfgenmsg
            hdr = attrs.get(NFQA_PACKET_HDR)
            if hdr is not None and len(hdr) >= _PACKET_HDR.size:
                pid, proto, hook = _PACKET_HDR.unpack_from(hdr)
                hw = attrs.get(NFQA_HWADDR)
                mac = None
                if hw is not None and len(hw) >= _HWADDR.size:
                    n, _pad, addr = _HWADDR.unpack_from(hw)
                    mac = addr[:n] if 0 < n <= 8 else None
                yield QueuedPacket(pid, proto, hook, mac, attrs.get(NFQA_PAYLOAD, b""))
        off += (ln + 3) & ~3


def syn_key(payload: bytes) -> bytes | None:
    """For an IPv4 TCP SYN (without ACK): its addresses, ports and initial sequence number; None for any other packet.

    A client whose SYN is held sends it again (after 1, 3, 7 ... s) with the
    same sequence number: the same attempt.  Releasing the first is enough,
    so a holder keeps one, and a hold of minutes does not fill the bound
    with retransmissions.
    """
    if len(payload) < 20 or payload[0] >> 4 != 4 or payload[9] != 6:
        return None
    ihl = (payload[0] & 0x0F) * 4
    if struct.unpack_from("!H", payload, 6)[0] & 0x1FFF or len(payload) < ihl + 14:
        return None  # a fragment after the first, or cut short: no TCP header to read
    if payload[ihl + 13] & 0x12 != 0x02:  # SYN set, ACK clear
        return None
    return payload[12:20] + payload[ihl:ihl + 8]  # source and destination addresses; ports, sequence number


def ethernet_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (no FCS: the driver adds it)."""
    return dst + src + struct.pack("!H", ethertype) + payload


def format_mac(mac: bytes) -> str:
    """``02:00:00:00:00:01`` from 6 bytes."""
    return ":".join(f"{b:02x}" for b in mac)


# -- the holder ----------------------------------------------------------------


@dataclass(frozen=True)
class HoldStats:
    """What a holder has done since it started.

    Packets held now, held in all, released (sent back to the switch), dropped
    over the bound, not sendable, dropped while not holding (queued after
    the release grace: admission closed by another process), and SYNs not
    kept because the same one was held already (a client's retransmission).
    """

    held: int
    held_total: int
    released: int
    over_limit: int
    unsendable: int
    not_holding: int
    repeated: int = 0


class Holder:
    """Binds NFQUEUE ``queue`` in namespace ``netns`` and holds what it gets until :meth:`release`.

    ``inside_if`` is the interface released packets leave by, addressed to
    its own MAC (the gateway's, which both NATs of a migration share), from
    the MAC of the host that sent them.  At most ``limit`` packets are held;
    beyond that each is dropped, counted and logged; a SYN already held is
    not kept again (:func:`syn_key`).  Right after
    :meth:`release` a packet still read from the queue (one marked just
    before admission opened) is sent on at once, after those held (see
    :data:`RELEASE_GRACE`).
    The sockets are opened in the node's namespace from any process, so a
    test can hold for a node it does not live in.  Thread-safe.
    """

    def __init__(self, netns: str | None, queue: int, inside_if: str, *, limit: int = HOLD_LIMIT) -> None:
        self.netns = netns
        self.queue = queue
        self.inside_if = inside_if
        self.limit = limit
        self._lock = threading.Lock()
        self._held: list[QueuedPacket] = []
        self._syns: set[bytes] = set()  # syn_key of each SYN held now
        self._holding = False
        self._pass_until = 0.0
        self._held_total = self._released = self._over = self._unsendable = self._not_holding = self._repeated = 0
        self._nl = open_socket(netns)  # bound: the queue is bound to its port id
        try:
            self._nl.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            # A full receive buffer loses packets (the kernel drops them, as
            # it would with no listener); without this it also fails the next
            # recv() with ENOBUFS, which would only stop the reader.
            self._nl.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self._request(bind_message(queue), f"bind queue {queue}")
            self._out = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends, receives nothing
        except BaseException:
            self._nl.close()
            raise
        try:
            self._out.bind((inside_if, 0))
            self.mac: bytes = self._out.getsockname()[4][:6]
        except OSError as e:
            self._out.close()
            self._nl.close()
            raise NfqueueError(f"NFQUEUE holder in {netns}: interface {inside_if}: {e.strerror}", e.errno) from e
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread = threading.Thread(target=self._read, name=f"nfqueue-{netns}-{queue}", daemon=True)
        self._thread.start()

    def _request(self, msg: bytes, what: str) -> None:
        """Send an acknowledged request and wait for its answer (packets are not queued yet: only the ack comes)."""
        (seq,) = struct.unpack_from("=I", msg, 8)
        self._nl.settimeout(5.0)
        try:
            self._nl.send(msg)
            while True:
                for item in parse(self._nl.recv(1 << 16)):
                    if isinstance(item, NetlinkAck) and item.seq == seq:
                        if item.errno:
                            name = errno.errorcode.get(item.errno, str(item.errno))
                            raise NfqueueError(f"NFQUEUE in {self.netns}: {what}: {name} ({os.strerror(item.errno)})", item.errno)
                        return
        except OSError as e:
            raise NfqueueError(f"NFQUEUE in {self.netns}: {what}: {e}", e.errno) from e
        finally:
            self._nl.settimeout(None)

    # -- holding and releasing ---------------------------------------------

    def hold(self) -> None:
        """Keep what the queue brings from now on (call before admission closes)."""
        with self._lock:
            self._holding = True

    def release(self) -> int:
        """Stop holding and send every held packet on, in arrival order (call after admission opened); how many."""
        with self._lock:
            self._holding = False
            self._pass_until = time.monotonic() + RELEASE_GRACE
            held, self._held = self._held, []
            self._syns.clear()
            for i, p in enumerate(held, 1):
                self._emit(p)
                if i % RELEASE_BURST == 0:
                    time.sleep(RELEASE_PAUSE)
            return len(held)

    def stats(self) -> HoldStats:
        """The counters (see :class:`HoldStats`)."""
        with self._lock:
            return HoldStats(len(self._held), self._held_total, self._released, self._over, self._unsendable, self._not_holding,
                             self._repeated)

    def _emit(self, p: QueuedPacket) -> None:
        """Send one packet out of the inside interface to the gateway's MAC (called under the lock)."""
        if p.hwaddr is None or len(p.hwaddr) != 6:
            self._unsendable += 1
            log.warning("NFQUEUE %s: packet %d has no Ethernet source address; dropped", self.netns, p.packet_id)
            return
        try:
            self._out.send(ethernet_frame(self.mac, p.hwaddr, p.hw_protocol or ETH_P_IP, p.payload))
            self._released += 1
        except OSError as e:
            self._unsendable += 1
            log.warning("NFQUEUE %s: cannot send packet %d out of %s: %s", self.netns, p.packet_id, self.inside_if, e)

    def _take(self, p: QueuedPacket) -> None:
        with self._lock:
            if not self._holding:
                if time.monotonic() < self._pass_until:
                    self._emit(p)
                else:
                    self._not_holding += 1
                    if self._not_holding % 1000 == 1:
                        log.warning("NFQUEUE %s: queued while this process does not hold (admission closed elsewhere?): "
                                    "%d dropped so far", self.netns, self._not_holding)
            elif (syn := syn_key(p.payload)) is not None and syn in self._syns:
                self._repeated += 1
            elif len(self._held) < self.limit:
                self._held.append(p)
                self._held_total += 1
                if syn is not None:
                    self._syns.add(syn)
            else:
                self._over += 1
                # One line for the first and then every 1,000th: a flood must not flood the log too.
                if self._over % 1000 == 1:
                    log.warning("NFQUEUE %s: %d packet(s) held, the limit; %d dropped so far", self.netns, self.limit, self._over)

    # -- the reader thread -------------------------------------------------

    def _read(self) -> None:
        poller = select.poll()  # not select(): an agent may hold more than 1,024 descriptors
        poller.register(self._nl, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r.fileno() in ready:
                    return
                data = self._nl.recv(1 << 17)
                for item in parse(data):
                    if isinstance(item, QueuedPacket):
                        # The copy is whole: the kernel's packet is dropped at once (see the module docstring).
                        self._nl.send(verdict_message(self.queue, item.packet_id, NF_DROP))
                        self._take(item)
                    elif item.errno:
                        log.warning("NFQUEUE %s: kernel error %s", self.netns, errno.errorcode.get(item.errno, item.errno))
        except OSError as e:
            if not self._stop:
                log.error("NFQUEUE %s: reader stopped: %s", self.netns, e)

    def close(self) -> None:
        """Stop the reader, unbind the queue, then release what is held (idempotent).

        In that order: a packet released while admission is still closed
        comes back to a queue nobody listens on and is dropped, not read and
        sent round again.
        """
        if self._stop:
            return
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        try:
            self._nl.send(unbind_message(self.queue))
        except OSError:
            pass  # closing the socket unbinds too
        self._nl.close()
        self.release()
        for s in (self._out, self._wake_r, self._wake_w):
            s.close()
