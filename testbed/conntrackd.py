"""conntrackd (conntrack-tools' state-sync daemon) between two NAT namespaces: the peer natmig is measured against.

The tool operators pick for NAT failover: each node runs conntrackd, which
mirrors its kernel table to the other node over a sync link (FTFW: reliable
UDP with acknowledgements); on failover the standby commits what it received
(its "external cache") into its own kernel with ``conntrackd -c``.

:class:`ConntrackdPair` runs that between two namespaces ``a`` (the source)
and ``b`` (the target) with nothing of the system's: the Debian package's
service is never started (``make system`` installs it under a policy-rc.d
that forbids starting services), and each daemon has a private config, UNIX
socket, lock file and log under ``home`` (natmig's run dir), and a sync veth
between the two namespaces on 198.51.100.0/24.  conntrackd writes no pidfile
one can choose, so each daemon is found by its config path (unique to
``home``) in /proc and stopped by that pid, never by name.  The config is the
one that was measured to work here (conntrackd 1.4.7, Debian 12).
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import netns
from ..errors import TestbedError
from .ovs import _kill  # the one SIGTERM-then-SIGKILL of a daemon by pid

#: The sync link: a veth between the two namespaces, one address each.
SYNC_IF = "ctsync0"
SYNC_ADDRESSES = ("198.51.100.1", "198.51.100.2")
SYNC_PREFIX = 24
SYNC_PORT = 3780
#: FTFW's resend queue, in objects: what a lost message can still be sent again from (conntrackd's
#: default, 131,072, is smaller than a bulk of 1,000,000).  Raising it alone did not make a 1M bulk's
#: losses good: the sender never sent them again (see RCV_BUFFER, which keeps them from happening).
RESEND_QUEUE = 2_097_152
#: The sync socket's receive buffer, bytes (SO_RCVBUFFORCE: past net.core.rmem_max).  A bulk of
#: 1,000,000 is ~67,000 datagrams sent in ~1.5 s, faster than the receiving daemon files them; with
#: ~25 MB ~4% were dropped at its socket and FTFW never sent them again (the receiver counted 14,513
#: lost messages and asked for them; the sender sent nothing more), so the sync stalled at 79-95%
#: in one run of two.  Room for the whole bulk (truesize ~2.3 KB a datagram) takes the loss away.
RCV_BUFFER = 268_435_456
#: Addresses whose entries are never synced: loopback and the sync link itself
#: (conntrackd's own UDP flow would otherwise be mirrored to the other side).
ALWAYS_IGNORED = ("127.0.0.1", "198.51.100.0/24")

#: Requests of conntrackd's UNIX socket (include/conntrackd.h of conntrack-tools
#: 1.4.7): the client sends one native int and reads text until the daemon
#: closes.  Polled this way rather than through ``conntrackd -s cache``: a
#: process start every few ms takes CPU from the daemons being timed on two cores.
STATS_CACHE = 29

_ACTIVE = re.compile(r"^cache:(internal|external)\s+active objects:\s+(\d+)", re.M)
_COMMITTED = re.compile(r"Committed (\d+) new entries")
_COMMIT_TOOK = re.compile(r"commit has taken ([0-9.]+) seconds")


class ConntrackdError(TestbedError):
    """conntrackd could not be started, did not sync or commit in time, or refused a request."""


@dataclass(frozen=True)
class CacheCounts:
    """Active entries in a daemon's caches: its own kernel's (internal) and those received from its peer (external)."""

    internal: int
    external: int


def parse_cache_stats(text: str) -> CacheCounts:
    """The active objects of both caches in conntrackd's cache statistics (``-s cache``)."""
    found = {kind: int(n) for kind, n in _ACTIVE.findall(text)}
    if set(found) != {"internal", "external"}:
        raise ConntrackdError(f"conntrackd cache statistics without both caches: {text[:200]!r}")
    return CacheCounts(found["internal"], found["external"])


def config_text(home: Path, name: str, local: str, peer: str, ignore: Sequence[str] = ()) -> str:
    """The private configuration of daemon ``name``: FTFW over the sync veth, every file under ``home``.

    Sizes as measured to hold 100k entries and more: hash and netlink
    buffers large enough that a bulk does not overflow them, socket buffers
    of ~24 MB so a burst of sync messages is not dropped.  ``ignore``:
    addresses (or prefixes) whose entries are not synced, besides
    :data:`ALWAYS_IGNORED`.
    """
    addrs = "\n".join(f"      IPv4_address {a}" for a in (*ALWAYS_IGNORED, *ignore))
    return f"""# natmig: conntrackd {name}, private to {home}
General {{
  Systemd off
  HashSize 262144
  HashLimit 2097152
  Syslog off
  LogFile {home}/{name}.log
  LockFile {home}/{name}.lock
  UNIX {{
    Path {home}/{name}.sock
  }}
  NetlinkBufferSize 8388608
  NetlinkBufferSizeMaxGrowth 67108864
  NetlinkEventsReliable On
  Filter From Userspace {{
    Address Ignore {{
{addrs}
    }}
  }}
}}
Sync {{
  Mode FTFW {{
    DisableExternalCache Off
    ResendQueueSize {RESEND_QUEUE}
  }}
  UDP {{
    IPv4_address {local}
    IPv4_Destination_Address {peer}
    Port {SYNC_PORT}
    Interface {SYNC_IF}
    SndSocketBuffer 24985600
    RcvSocketBuffer {RCV_BUFFER}
    Checksum on
  }}
}}
"""


def pids_of(config: Path) -> list[int]:
    """Running conntrackd processes started with ``-C config`` (found in /proc: conntrackd writes no pidfile of ours)."""
    want = str(config).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].rsplit(b"/", 1)[-1] == b"conntrackd" and any(
            argv[i] == b"-C" and argv[i + 1] == want for i in range(len(argv) - 1)
        ):
            found.append(int(d.name))
    return found


class ConntrackdPair:
    """conntrackd in namespaces ``a`` (source) and ``b`` (target), FTFW over a sync veth, files under ``home``.

    Use as a context manager: started on entry, and on exit (also after a
    failure) both daemons are stopped by pid, the sync veth removed and
    ``home`` deleted.
    """

    def __init__(self, a: str, b: str, home: Path, ignore: Sequence[str] = ()) -> None:
        self.ns = {"a": a, "b": b}
        self.home = Path(home)
        self.ignore = tuple(ignore)

    def config(self, side: str) -> Path:
        """The config file of side ``a`` or ``b``."""
        return self.home / f"{side}.conf"

    def log(self, side: str) -> Path:
        """The log file of side ``a`` or ``b``."""
        return self.home / f"{side}.log"

    def __enter__(self) -> "ConntrackdPair":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """The sync veth, both configs and both daemons; returns once both answer on their sockets.

        Each daemon reads its namespace's table into its internal cache as it
        starts; :meth:`wait_internal` tells when that is done.
        """
        self.stop()  # leftovers of a crashed run with this home
        self.home.mkdir(parents=True, exist_ok=True)
        a, b = self.ns["a"], self.ns["b"]
        netns.add_veth(SYNC_IF, SYNC_IF, a, b)
        for side, ns, local, peer in (("a", a, *SYNC_ADDRESSES), ("b", b, *reversed(SYNC_ADDRESSES))):
            netns.run(["ip", "addr", "add", f"{local}/{SYNC_PREFIX}", "dev", SYNC_IF], ns)
            self.config(side).write_text(config_text(self.home, side, local, peer, self.ignore))
        for side in ("a", "b"):
            # -d: conntrackd forks into the background and the parent exits once it is initialised.
            netns.run(["conntrackd", "-C", str(self.config(side)), "-d"], self.ns[side], timeout=timeout)
        deadline = time.monotonic() + timeout
        for side in ("a", "b"):
            while True:
                try:
                    self.counts(side)
                    break
                except ConntrackdError:
                    if time.monotonic() > deadline:
                        raise ConntrackdError(f"conntrackd {side} in {self.ns[side]} not answering after {timeout} s: {self._log_tail(side)}") from None
                    time.sleep(0.02)
            if not pids_of(self.config(side)):
                raise ConntrackdError(f"conntrackd {side} in {self.ns[side]} is not running: {self._log_tail(side)}")

    def pids(self) -> dict[str, list[int]]:
        """The running daemons of this pair, by side."""
        return {side: pids_of(self.config(side)) for side in ("a", "b")}

    def stop(self) -> None:
        """Stop both daemons by pid, remove the sync veth and ``home`` (idempotent)."""
        for side in ("a", "b"):
            for pid in pids_of(self.config(side)):
                _kill(pid, 3.0)
        for ns in self.ns.values():
            # Deleting one end removes both; the other call finds nothing.
            if netns.exists(ns) and netns.link_exists(SYNC_IF, ns):
                netns.delete_link(SYNC_IF, ns)
        shutil.rmtree(self.home, ignore_errors=True)

    def counts(self, side: str) -> CacheCounts:
        """Active entries of side ``side``'s caches, asked over its UNIX socket."""
        path = str(self.home / f"{side}.sock")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10.0)
                s.connect(path)
                s.sendall(struct.pack("=i", STATS_CACHE))
                chunks = []
                while chunk := s.recv(1 << 16):
                    chunks.append(chunk)
        except OSError as e:
            raise ConntrackdError(f"conntrackd {side} ({path}): {e}") from e
        return parse_cache_stats(b"".join(chunks).decode(errors="replace"))

    def wait_internal(self, side: str, expect: int, timeout: float = 60.0) -> float:
        """Wait until side ``side``'s internal cache holds at least ``expect`` entries; the seconds waited."""
        return self._wait(side, "internal", expect, timeout)

    def sync(self, expect: int, timeout: float = 120.0) -> float:
        """Have ``a`` send its whole table to ``b`` (a bulk, ``conntrackd -B``); the seconds until ``b`` holds ``expect`` entries.

        What the sync needs to bring an existing table over, measured from
        the request to the last entry counted in ``b``'s external cache.
        """
        t0 = time.perf_counter()
        self._client("a", "-B")
        self._wait("b", "external", expect, timeout)
        return time.perf_counter() - t0

    def commit(self, timeout: float = 300.0) -> tuple[float, int, float | None]:
        """``conntrackd -c`` on ``b``: its external cache into its kernel.

        (wall seconds of the command, entries its log says it committed,
        seconds its log says the commit took).  The command returns when
        the daemon has finished.
        """
        before = self._log_text("b")
        t0 = time.perf_counter()
        self._client("b", "-c", timeout=timeout)
        took = time.perf_counter() - t0
        new = self._log_text("b")[len(before):]
        committed = sum(int(n) for n in _COMMITTED.findall(new))
        logged = _COMMIT_TOOK.findall(new)
        return took, committed, float(logged[-1]) if logged else None

    def _client(self, side: str, *args: str, timeout: float = 60.0) -> None:
        # The client only talks to the daemon's UNIX socket: it needs no
        # namespace (it warns, harmlessly, that the sync interface is not there).
        try:
            netns.run(["conntrackd", "-C", str(self.config(side)), *args], None, timeout=timeout)
        except netns.CommandError as e:
            raise ConntrackdError(f"conntrackd {side} {' '.join(args)}: {e}") from e

    def _wait(self, side: str, cache: str, expect: int, timeout: float) -> float:
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            c = self.counts(side)
            got = c.internal if cache == "internal" else c.external
            if got >= expect:
                return time.perf_counter() - t0
            if time.monotonic() > deadline:
                raise ConntrackdError(f"conntrackd {side}: {got} of {expect} entries in its {cache} cache after {timeout} s")
            time.sleep(0.002)

    def _log_text(self, side: str) -> str:
        try:
            return self.log(side).read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, side: str) -> str:
        return self._log_text(side)[-800:].strip() or "(no log)"
