"""``conntrack -E`` of a namespace, read by a thread: the conntrack provider's :class:`~.provider.Watch`."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time

from .. import netns as nsmod
from ..errors import ProviderError
from . import ctnetlink as nl
from . import cttext
from .provider import SessionEvent, Watch


def _subscribed(pid: int) -> bool:
    """Whether process ``pid`` holds a netfilter netlink socket that joined multicast groups.

    ``ip netns exec`` execs conntrack in place, so the pid is conntrack's;
    /proc/PID/net/netlink lists the sockets of its namespace, and the
    process's fds say which of them are its own.
    """
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        with open(f"/proc/{pid}/net/netlink") as f:
            for line in f:
                col = line.split()
                # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
                if len(col) >= 10 and col[1] == str(nl.NETLINK_NETFILTER) and col[9] in inodes and int(col[3], 16):
                    return True
    except (OSError, ValueError):
        return False
    return False


class _ConntrackWatch(Watch):
    """Reads ``conntrack -E -e NEW,DESTROY`` of a namespace in a thread, into a queue."""

    # conntrack subscribes some time after it started (longer on a busy
    # machine); events before that are lost, so watch() returns only once
    # the kernel shows its socket joined the event groups, or after this long.
    READY_TIMEOUT = 5.0

    def __init__(self, netns: str) -> None:
        self.q: queue.Queue[SessionEvent | None] = queue.Queue()
        self.ended = False
        self.proc = subprocess.Popen(
            nsmod.ns_cmd(["conntrack", "-E", "-e", "NEW,DESTROY"], netns),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.thread = threading.Thread(target=self._read, name=f"ct-watch-{netns}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.READY_TIMEOUT
        while not _subscribed(self.proc.pid) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        if self.proc.poll() is not None:
            raise ProviderError(f"conntrack -E in {netns} exited {self.proc.returncode}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                ev = cttext.parse_event(line)
                if ev is not None:
                    self.q.put(SessionEvent(ev.kind, ev.session))
        except (OSError, ValueError):
            pass  # the pipe was closed under us by close()
        finally:
            # Wake a reader blocked in get(): the stream has ended.
            self.ended = True
            self.q.put(None)

    def get(self, timeout: float | None = None) -> SessionEvent | None:
        """The next event, or None when ``timeout`` passes first or the stream has ended."""
        if self.ended and self.q.empty():
            return None
        try:
            return self.q.get(timeout=timeout) if timeout != 0 else self.q.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop the reader process (our own child, by pid)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(2)
