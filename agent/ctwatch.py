"""``conntrack -E`` of a namespace, read by a thread: the conntrack provider's :class:`~.provider.Watch`."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

#: conntrack's event socket buffer (``-b``; the kernel doubles it).  With the tool's default
#: (the sysctl's, ~200 KB) a flush of a 1,000,000-entry table, or a million-session copy
#: with churn beside it, overflowed it, and the tool then goes on without the events lost.
EVENT_BUFFER = 64 << 20


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
    """Reads ``conntrack -E -e NEW,DESTROY`` of a namespace in a thread, into a queue.

    What the tool says on stderr is logged: above all that the kernel
    dropped events (ENOBUFS), which the tool survives without telling its
    reader on stdout.  A stream with a gap makes a migration's digests
    differ at verify (which then reads what differs), or its catch-up meet
    a port still held by a closed connection whose end was lost.
    """

    # conntrack subscribes some time after it started (longer on a busy
    # machine); events before that are lost, so watch() returns only once
    # the kernel shows its socket joined the event groups, or after this long.
    READY_TIMEOUT = 5.0

    def __init__(self, netns: str) -> None:
        self.q: queue.Queue[SessionEvent | None] = queue.Queue()
        self.ended = False
        self.proc = subprocess.Popen(
            nsmod.ns_cmd(["conntrack", "-E", "-e", "NEW,DESTROY", "-b", str(EVENT_BUFFER)], netns),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        self.netns = netns
        #: times the tool said the kernel dropped events
        self.lost = 0
        self.thread = threading.Thread(target=self._read, name=f"ct-watch-{netns}", daemon=True)
        self.thread.start()
        threading.Thread(target=self._complaints, name=f"ct-watch-err-{netns}", daemon=True).start()
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

    def _complaints(self) -> None:
        """Log what the tool writes to stderr; count its event losses."""
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                line = line.strip()
                if "ENOBUFS" in line or "losing events" in line:
                    self.lost += 1
                    log.warning("conntrack -E in %s: the kernel dropped events (%d time(s) so far): %s", self.netns, self.lost, line)
                elif line and not line.startswith(("NOTICE", "conntrack v")):
                    log.info("conntrack -E in %s: %s", self.netns, line)
        except (OSError, ValueError):
            pass  # closed under us by close()

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
