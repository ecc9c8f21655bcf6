"""A testbed's prefix and what of it exists on this machine: its state directory, its leftovers, its lock.

Every testbed is found again by its prefix (``/run/natmig/P/``, namespaces
``P-*``), even after a crashed or killed run; one up or down at a time runs
per prefix, across processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .. import netns
from ..errors import TestbedError
from .ovs import Ovs

#: Where every testbed keeps its state directory (one per prefix).
STATE_ROOT = Path("/run/natmig")
#: The prefix used when none is given, so `natmig testbed up` and a later
#: `natmig migrate` or `natmig testbed down` find the same testbed.
DEFAULT_PREFIX = "natmig"
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,9}$")


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can prefix namespace names, else raise :class:`TestbedError`."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise TestbedError(f"prefix {prefix!r}: must be a-z then a-z 0-9, at most 10 characters (e.g. nm4711)")
    return prefix


def leftovers(prefix: str, state_root: Path = STATE_ROOT) -> dict[str, list]:
    """What of a testbed with this prefix still exists: namespaces, root-namespace links, daemons, state dir."""
    check_prefix(prefix)
    home = state_root / prefix
    links = netns.run(["ip", "-o", "link", "show"], check=False).stdout
    root_links = sorted({m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", links, re.M) if m.group(1).startswith(f"{prefix}-")})
    return {
        "namespaces": netns.list_netns(f"{prefix}-"),
        "root_links": root_links,
        "processes": sorted(pid for d in sorted(home.glob("ovs*")) for pid in Ovs(d).pids().values()),
        "state_dir": [str(home)] if home.exists() else [],
        "lock_file": [str(lock)] if (lock := state_root / f".{prefix}.lock").exists() else [],
    }


def known_prefixes(state_root: Path = STATE_ROOT) -> list[str]:
    """Prefixes that look like testbeds here: a state dir, or a ``P-ovs``/``P-mgmt`` namespace.

    For finding the leftovers of crashed runs; it only lists, and the
    namespace rule may also match namespaces of another tool.
    """
    found = {p.name for p in state_root.iterdir() if p.is_dir() and _PREFIX.match(p.name)} if state_root.is_dir() else set()
    for ns in netns.list_netns():
        head, _, tail = ns.rpartition("-")
        if tail in ("ovs", "mgmt") and _PREFIX.match(head):
            found.add(head)
    return sorted(found)


def lock_file(state_root: Path, prefix: str) -> Path:
    """The file whose lock :func:`held` takes for ``prefix``: beside the state dir, so that down can remove the dir itself."""
    return state_root / f".{prefix}.lock"


@contextmanager
def held(state_root: Path, prefix: str) -> Iterator[None]:
    """One up/down at a time per prefix, across processes."""
    state_root.mkdir(parents=True, exist_ok=True)
    path = lock_file(state_root, prefix)
    while True:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            # down() unlinks the file while holding it; a waiter that got
            # the lock of an unlinked file must take the new one instead.
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return


def read_json(path: Path) -> dict[str, Any]:
    """A JSON state file's content; empty when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
