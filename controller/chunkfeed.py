"""A reply read on a thread of its own, its chunks handed to the caller's thread as they arrive, a bounded number waiting.

Both forwarded copies (the generic engine's :class:`~.enginecopy.ForwardedLists`
and the NAT engine's :mod:`.migcopytext`) read the source's reply this way:
the agent streams a large table while it reads it, and the slices of it go on
to the target before the reply is complete.  When the caller falls behind,
the rest of the reply waits in the source's SSH window, not in this process.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

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
