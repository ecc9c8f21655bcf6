"""Network namespaces, veths and commands run inside them: the one place natmig does it.

Everything natmig creates is named with a run prefix (see :func:`run_prefix`),
so leftovers of a crashed run can be found and removed by name, and two runs
on one machine do not collide.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import NatmigError

NETNS_DIR = Path("/run/netns")
#: setns(2)'s namespace type for network namespaces.
CLONE_NEWNET = 0x40000000


class NetnsError(NatmigError):
    """A network namespace could not be entered (it does not exist, or setns(2) refused)."""


class CommandError(NatmigError):
    """A system command failed; carries the command, exit status and stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.cmd)} exited {returncode}: {self.stderr}")


def _setns(fd: int) -> None:
    """setns(2) of the calling thread into the network namespace open as ``fd``; OSError on failure."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
    elif _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _open(name: str) -> int:
    """A descriptor of the named namespace; :class:`NetnsError` naming it when there is none."""
    try:
        return os.open(NETNS_DIR / name, os.O_RDONLY)
    except OSError as e:
        raise NetnsError(f"network namespace {name}: {e.strerror or e}") from e


def enter(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (setns(2)).

    setns moves only the calling thread: call it before any other thread
    exists to move a whole process (the agent), or in a thread of its own
    (:func:`call_in`).  Python 3.11 has no os.setns, so there it goes through libc.
    """
    fd = _open(name)
    try:
        _setns(fd)
    except OSError as e:
        raise NetnsError(f"network namespace {name}: setns failed: {e.strerror or e}") from e
    finally:
        os.close(fd)


#: Serialises :func:`socket_in`'s visits: no two threads of one process are
#: between entering a namespace and coming back at once.
_visit_lock = threading.Lock()


def socket_in(name: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket made in namespace ``name`` (the caller's when None); it stays there for life.

    The calling thread enters the namespace for the ``socket()`` call only
    and comes back at once, cheaper than :func:`call_in`'s thread (the
    agent opens its netlink sockets this way, some per request).
    :class:`NetnsError` when the namespace cannot be entered or left.
    """
    if name is None:
        return socket.socket(family, kind, proto)
    target = _open(name)
    try:
        with _visit_lock:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                try:
                    _setns(target)
                except OSError as e:
                    raise NetnsError(f"network namespace {name}: setns failed: {e.strerror or e}") from e
                try:
                    return socket.socket(family, kind, proto)
                finally:
                    # Always go home: this thread must not stay in the other namespace.
                    try:
                        _setns(home)
                    except OSError as e:
                        raise NetnsError(f"network namespace {name}: setns back failed: {e.strerror or e}") from e
            finally:
                os.close(home)
    finally:
        os.close(target)


def call_in(name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a throw-away thread that has entered network namespace ``name``; its result (or its exception).

    A socket keeps the namespace it was made in: a connection opened by
    ``fn`` goes on working from the caller's threads, which never change
    namespace.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            enter(name)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, name=f"natmig-in-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def run_prefix(tag: str = "nm") -> str:
    """A short prefix unique to this process, e.g. ``nm4711``, for names of things it makes."""
    return f"{tag}{os.getpid() % 100000}"


def ns_cmd(cmd: Sequence[str], netns: str | None) -> list[str]:
    """The argv that runs ``cmd`` in ``netns`` (unchanged when netns is None or is this process's own)."""
    return (["ip", "netns", "exec", netns, *cmd]) if netns and not inside(netns) else list(cmd)


def inside(name: str) -> bool:
    """Whether this process already lives in the named namespace (as an agent does after --netns).

    Then a command needs no ``ip netns exec``, which costs an extra exec, a
    mount namespace and a sysfs remount (~1.5 ms of each of the agent's
    conntrack and nft calls).  Checked on every call, two stat(2)s: a process
    may still change namespace at start-up.
    """
    try:
        own = os.stat("/proc/self/ns/net")
        named = os.stat(NETNS_DIR / name)
    except OSError:
        return False
    return (own.st_dev, own.st_ino) == (named.st_dev, named.st_ino)


def run(
    cmd: Sequence[str],
    netns: str | None = None,
    *,
    input: str | bytes | None = None,
    check: bool = True,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a command (in a namespace; with ``env`` as its whole environment when given) and return it; :class:`CommandError` on failure."""
    argv = ns_cmd(cmd, netns)
    text = not isinstance(input, bytes)
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, text=text, timeout=timeout, env=env)
    except FileNotFoundError as e:
        raise CommandError(argv, 127, f"{argv[0]}: not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from e
    if check and cp.returncode != 0:
        err = cp.stderr if text else cp.stderr.decode(errors="replace")
        raise CommandError(argv, cp.returncode, err)
    return cp


def exists(name: str) -> bool:
    """Whether the named namespace exists."""
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Named namespaces whose name starts with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def add(name: str, *, ipv6: bool = False) -> None:
    """Create a namespace with loopback up (idempotent); IPv6 off unless asked.

    IPv6 is off by default because router solicitations and DAD add packets
    that no test asked for.
    """
    if not exists(name):
        run(["ip", "netns", "add", name])
    run(["ip", "link", "set", "lo", "up"], name)
    if not ipv6:
        sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1)
        sysctl(name, "net.ipv6.conf.default.disable_ipv6", 1)


def delete(name: str) -> None:
    """Delete a namespace, killing what still runs in it (idempotent)."""
    if not exists(name):
        return
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "delete", name], check=False)


def sysctl(netns: str | None, key: str, value: object) -> None:
    """Set a sysctl in a namespace."""
    run(["sysctl", "-q", "-w", f"{key}={value}"], netns)


def ensure_conntrack_capacity(entries: int) -> None:
    """Raise the machine-wide conntrack limit to at least ``entries`` (never lowers it).

    nf_conntrack_max is global (set from the root namespace only); raising it
    is harmless for everyone else on the machine.  Benchmarks and tests call
    this explicitly; the library never does it behind anyone's back.
    """
    current = int(open("/proc/sys/net/netfilter/nf_conntrack_max").read())
    if current < entries:
        sysctl(None, "net.netfilter.nf_conntrack_max", entries)


def add_veth(a: str, b: str, netns_a: str | None, netns_b: str | None, *, mtu: int | None = None) -> None:
    """Create a veth pair a<->b with each end in its namespace, offloads off, both up.

    Offloads must be off on both ends: with them on, TCP through the Open
    vSwitch userspace datapath carries bad checksums and stalls.
    """
    # Create in the first namespace and move the peer, so no end ever needs
    # a free name in the root namespace.
    if netns_b and netns_b != netns_a:
        # Creating the peer directly in its namespace takes ~6 ms; moving it
        # there afterwards costs ~50 ms of kernel time per veth.
        run(["ip", "link", "add", a, "type", "veth", "peer", "name", b, "netns", netns_b], netns_a)
    else:
        run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], netns_a)
        if netns_b != netns_a:
            run(["ip", "link", "set", b, "netns", netns_b or "1"], netns_a)
    for ifname, ns in ((a, netns_a), (b, netns_b)):
        if mtu:
            run(["ip", "link", "set", ifname, "mtu", str(mtu)], ns)
        disable_offloads(ifname, ns)
        run(["ip", "link", "set", ifname, "up"], ns)


def disable_offloads(ifname: str, netns: str | None) -> None:
    """Turn checksum and segmentation offloads off on an interface."""
    run(["ethtool", "-K", ifname, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off"], netns, check=False)


def link_exists(ifname: str, netns: str | None = None) -> bool:
    """Whether an interface exists in a namespace."""
    return run(["ip", "link", "show", ifname], netns, check=False).returncode == 0


def delete_link(ifname: str, netns: str | None = None) -> None:
    """Delete an interface if it exists."""
    run(["ip", "link", "del", ifname], netns, check=False)
