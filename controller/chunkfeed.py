"""A reply read on a thread of its own, its chunks handed to the caller's thread as they arrive, a bounded number waiting.

Both forwarded copies (the generic engine's :class:`~.enginecopy.ForwardedLists`
and the NAT engine's :mod:`.migcopytext`) read the source's reply this way:
the agent streams a large table while it reads it, and the slices of it go on
to the target before the reply is complete.  When the caller falls behind,
the rest of the reply waits in the source's SSH window, not in this process.
Their slices go on through a :class:`WriteWindow` (a few writes unanswered at
once), fed by a :class:`SliceFeed`.
"""

from __future__ import annotations

import collections
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, TypeVar

from ..wire.slices import EntryStream

T = TypeVar("T")

#: Chunks of a reply that may wait for the caller at once (an agent sends ~64 KB a chunk).
CHUNKS_QUEUED = 64


def feed_chunks(read: Callable[[Callable[[bytes | None], None]], T], take: Callable[[bytes], None], queued: int | None = None) -> T:
    """``read(put)`` on a thread of its own; each chunk it puts is handed to ``take`` in this thread; returns what
    ``read`` returned.

    An exception of ``take`` is raised once the reply has been drained to its
    end: ncclient's transport thread puts the chunks, and one that waited for a
    caller who had stopped taking them would hang the session.  ``queued``:
    how many may wait (default :data:`CHUNKS_QUEUED`, read at the call).
    """
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=queued if queued is not None else CHUNKS_QUEUED)
    drained = threading.Event()

    def put(chunk: bytes | None) -> None:
        # Waits while the caller is behind, never once it has stopped taking chunks.
        while not drained.is_set():
            try:
                chunks.put(chunk, timeout=0.1)
                return
            except queue.Full:
                pass

    failure: BaseException | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="natmig-read") as reader:
        reading = reader.submit(read, put)
        reading.add_done_callback(lambda _f: put(None))
        try:
            while (chunk := chunks.get()) is not None:
                if failure is None:
                    try:
                        take(chunk)
                    except BaseException as e:  # noqa: BLE001 - the reader must still be drained; raised below
                        failure = e
        finally:
            drained.set()
        result = reading.result()
    if failure is not None:
        raise failure
    return result


class WriteWindow:
    """Writes on ``pool`` with at most ``ahead`` unanswered; once one was refused, no more are sent.

    Both forwarded copies send their slices this way: requests in flight, the
    target's agent handles them in order and reads the next meanwhile.
    """

    def __init__(self, pool: ThreadPoolExecutor, ahead: int) -> None:
        self.pool, self.ahead = pool, ahead
        self.writes: collections.deque[Future[Any]] = collections.deque()

    def refused(self) -> bool:
        """Whether a write sent so far has failed."""
        return any(w.done() and w.exception() is not None for w in self.writes)

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """``fn(*args)`` on the pool once fewer than ``ahead`` wait; False (nothing sent) once a write was refused."""
        while len(self.writes) >= self.ahead and not self.refused():
            wait([self.writes[0]])
            if self.writes[0].exception() is None:
                self.writes.popleft()
        if self.refused():
            return False
        self.writes.append(self.pool.submit(fn, *args))
        return True

    def finish(self) -> None:
        """Wait for every write; the first refusal is raised."""
        for w in self.writes:
            w.result()


class SliceFeed:
    """``take`` of :func:`feed_chunks` for a copy that forwards slices: each chunk to ``stream``, its slices to ``send``.

    Once ``send`` says nothing more may go (False), later chunks are only
    counted, so that the reply's size can still be checked against what arrived.
    """

    def __init__(self, stream: EntryStream, send: Callable[[list[str]], bool]) -> None:
        self.stream, self.send = stream, send
        self.going = True

    def take(self, chunk: bytes) -> None:
        if self.going:
            self.going = self.send(self.stream.feed(chunk))
        else:
            self.stream.fed += len(chunk)
