"""Many creates or deletes at once: batches sent from a thread while the next one is packed.

Each message is packed by :mod:`.ctlayout`; the kernel's errors are matched
back by sequence number as for :func:`.ctnetlink.run_ops`.
"""

from __future__ import annotations

import errno
import queue
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

from ..model import NatSession
from .ctlayout import CREATE_MAX, CreateEncoder, TupleEncoder
from .ctnetlink import IPCTNL_MSG_CT_DELETE, SO_SNDBUFFORCE, NetlinkError, Tuple5, _collect_errors, _writer


#: Create messages per sendmsg() (~220 KB): 256 or 4,096 took as long
#: unthreaded; 1,024 leaves enough batches to overlap (see create_sessions).
CREATE_BATCH = 1024


def create_sessions(netns: str | None, items: Sequence[tuple[NatSession, int]], sock: socket.socket | None = None,
                    sent: list[tuple[int, int]] | None = None, alongside: Callable[[int, int], None] | None = None,
                    before: Callable[[int, int], None] | None = None) -> dict[int, int]:
    """Create each (session, timeout) with NLM_F_CREATE|NLM_F_EXCL; errno by index of those refused.

    A thread sends batch k while this one packs batch k+1: the kernel does
    its work inside sendto(), which releases the GIL (measured: 10k 29 ms
    -> 24 ms, 100k 330 ms -> 296 ms).  Stops after the first batch the
    kernel refused any of: the caller refuses the whole apply and undoes
    what was created, so sending the rest would only create more to undo.
    ``sock``: as for :func:`.ctnetlink.run_ops`.  ``sent`` gets the (start, stop) index
    range of each batch the kernel took: an item outside them was never sent.
    ``alongside(start, stop)`` runs in this thread once each batch is
    handed to the sender, while the kernel creates it: work on those items
    that would otherwise wait for the last batch (the live digest's).
    ``before(start, stop)`` runs in this thread before each batch is handed
    to the sender (a write-ahead journal's line for it).
    """
    failed: dict[int, int] = {}
    if not items:
        return failed
    with _writer(netns, sock) as w, _handing_over_often(alongside is not None or before is not None):
        per_batch = max(1, _fit_send_buffer(w, CREATE_BATCH * CREATE_MAX) // CREATE_MAX)
        _send_overlapped(w, _create_batches(items, per_batch, failed), failed, sent=sent, alongside=alongside, before=before)
    return failed


#: The interpreter's switch interval while work runs alongside the sender (seconds; Python's default is 0.005).
HANDOVER = 0.0005
_handover_lock = threading.Lock()
#: writers inside _handing_over_often, and the interval before the first
_handovers = 0
_saved_interval = 0.005


@contextmanager
def _handing_over_often(needed: bool) -> Iterator[None]:
    """A shorter switch interval while this thread works beside the sender, which needs the GIL between two sendto()s.

    With the default 5 ms, the sender waits for this thread's turn to end
    before each batch, and the kernel idles meanwhile (100k creates with
    the live digest folded alongside: ~650-760 ms, against ~555-590 ms
    with 0.5 ms, measured).  Process-wide, so counted: the last writer out
    puts the interval back.
    """
    global _handovers, _saved_interval
    if not needed:
        yield
        return
    with _handover_lock:
        if _handovers == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(HANDOVER)
        _handovers += 1
    try:
        yield
    finally:
        with _handover_lock:
            _handovers -= 1
            if _handovers == 0:
                sys.setswitchinterval(_saved_interval)


def _fit_send_buffer(sock: socket.socket, want: int) -> int:
    """Make room for one message of ``want`` bytes; the largest the socket then takes.

    The kernel refuses a netlink message larger than the send buffer
    (EMSGSIZE); the default (212,992 bytes) is smaller than a batch of TCP creates.
    """
    for opt in (SO_SNDBUFFORCE, socket.SO_SNDBUF):  # FORCE passes net.core.wmem_max, as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, want + 4096)
            break
        except PermissionError:
            continue
    # The kernel keeps 32 bytes of it for itself.
    return min(want, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64)


def _create_batches(items: Sequence[tuple[NatSession, int]], per_batch: int, failed: dict[int, int]) -> Iterator[tuple[int, int, memoryview]]:
    """(index of the first, index past the last, packed messages) of each batch, until a batch was refused."""
    enc = CreateEncoder()
    for start in range(0, len(items), per_batch):
        if failed:
            return
        stop = min(start + per_batch, len(items))
        # A new buffer per batch: the sender may still be reading the previous one.
        buf = bytearray((stop - start) * CREATE_MAX)
        yield start, stop, memoryview(buf)[:enc.pack(buf, items, start, stop)]


def _send_overlapped(sock: socket.socket, batches: Iterator[tuple[int, int, memoryview]], failed: dict[int, int],
                     what: str = "create", stop_on_error: bool = True, sent: list[tuple[int, int]] | None = None,
                     alongside: Callable[[int, int], None] | None = None, before: Callable[[int, int], None] | None = None) -> None:
    """Send each batch from a thread and collect its errors into ``failed`` while the next is being packed.

    ``stop_on_error``: send nothing more once the kernel refused a message
    (creates: the caller undoes them anyway); deletes go on, a missing entry
    (ENOENT) being no failure.  ``sent`` gets (start, stop) of each batch sent.
    ``alongside``, ``before``: as for :func:`create_sessions`.
    """
    todo: queue.Queue[tuple[int, int, memoryview] | None] = queue.Queue(maxsize=1)
    broken: list[Exception] = []

    def send() -> None:
        # Always drains the queue to its end, so the producer never blocks on it.
        while (batch := todo.get()) is not None:
            if (failed and stop_on_error) or broken:
                continue
            start, stop, data = batch
            try:
                sock.sendto(data, (0, 0))
                if sent is not None:
                    sent.append((start, stop))
                _collect_errors(sock, failed, start)
            except Exception as e:  # noqa: BLE001 -- raised again in the caller's thread
                broken.append(e)

    sender = threading.Thread(target=send, name=f"ct-{what}", daemon=True)
    sender.start()
    try:
        for batch in batches:
            if broken:
                break
            if before is not None:
                before(batch[0], batch[1])
            todo.put(batch)
            if alongside is not None:
                alongside(batch[0], batch[1])
    finally:
        todo.put(None)
        sender.join()
    if broken:
        raise NetlinkError(f"ctnetlink {what}: {broken[0]}") from broken[0]

#: Deletes per sendto(): some 60 bytes each, so a batch fits the default send buffer.
DELETE_BATCH = 1024
_DELETES = TupleEncoder(IPCTNL_MSG_CT_DELETE, 0)


def delete_keys(netns: str | None, keys: Sequence[Tuple5], sock: socket.socket | None = None) -> tuple[int, dict[int, int]]:
    """Delete the entries whose original tuple is each key; (how many were deleted, errors other than ENOENT by index).

    One CT_DELETE per key, no NLM_F_ACK (errors only), DELETE_BATCH per
    sendto, sent from a thread while the next batch is packed (100k:
    ~360 -> ~260 ms).  Keys must be valid (:func:`.ctbatch.invalid_keys`).
    The kernel finds a tuple in either direction: a key equal to another
    entry's reply tuple deletes that entry, so keys must be keys of sessions
    (the datastore deletes only keys its lookup found, the whole-list delete
    those its dump listed).  ``sock``: as for :func:`.ctnetlink.run_ops`.
    """
    failed = delete_tuples(netns, keys, sock)
    missing = sum(1 for e in failed.values() if e == errno.ENOENT)
    other = {i: e for i, e in failed.items() if e != errno.ENOENT}
    return len(keys) - missing - len(other), other


def delete_tuples(netns: str | None, keys: Sequence[Tuple5], sock: socket.socket | None = None) -> dict[int, int]:
    """:func:`delete_keys`, answering every errno by index, ENOENT (nothing deleted) included: each other key was deleted."""
    failed: dict[int, int] = {}
    if not keys:
        return failed

    def batches() -> Iterator[tuple[int, int, memoryview]]:
        for start in range(0, len(keys), DELETE_BATCH):
            stop = min(start + DELETE_BATCH, len(keys))
            # A new buffer per batch: the sender may still be reading the previous one.
            buf = bytearray((stop - start) * _DELETES.max)
            yield start, stop, memoryview(buf)[:_DELETES.pack(buf, keys, start, stop)]

    with _writer(netns, sock) as w:
        _send_overlapped(w, batches(), failed, "delete", stop_on_error=False)
    return failed

def delete_sessions(netns: str | None, sessions: Iterable[NatSession], sock: socket.socket | None = None) -> tuple[int, dict[int, int]]:
    """Delete by key; (how many were deleted, errors other than 'no such entry' by index)."""
    return delete_keys(netns, [s.key for s in sessions], sock)
