"""The target agent SIGKILLed while a large confirmed commit's creates are in the kernel, then restarted.

A commit of more than JOURNAL_AHEAD creates journals their keys batch by
batch, each line before the kernel gets that batch (agent/confirmed.py
``ConfirmedCommits.created``).  Killed part way, every session the kernel
holds must be in the journal (written ahead), and the restarted agent rolls
back all of them: the namespace ends with none of the commit's sessions.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from natmig import netns
from natmig.agent.confirmed import Journal
from natmig.agent.lab import AgentLab
from natmig.errors import NatmigError
from natmig.model import NatSession

pytestmark = pytest.mark.root

N = 60_000


def _count(lab: AgentLab) -> int:
    """Entries in the NAT namespace's conntrack table, read from inside it (no process per read)."""
    def read() -> int:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    return int(netns.call_in(lab.nat_ns, read))


def test_an_agent_killed_while_its_commit_creates_rolls_back_at_restart_everything_it_created(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with AgentLab(tmp_path / "lab", provider="conntrack", tag="kc", extra_args=["--state-dir", str(state)]) as lab:
        netns.ensure_conntrack_capacity(2 * N + 65536)
        sessions = [NatSession("UDP", f"10.0.{i // 250}.{i % 250 + 1}", 1024 + i % 50_000, "198.51.100.7", 53,
                               lab.public_address, 1024 + i, None, 600) for i in range(N)]
        client = lab.client(timeout=120)
        base = _count(lab)  # the agent's own management connection
        client.edit_sessions(sessions)
        failed: list[BaseException] = []

        def commit() -> None:
            try:
                client.commit(confirmed=True, timeout=600, persist="kill-test")
            except (NatmigError, OSError) as e:  # the agent dies under it
                failed.append(e)

        t = threading.Thread(target=commit, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        seen = base
        while time.monotonic() < deadline:
            seen = _count(lab) - base
            if seen >= N // 4:
                break
            time.sleep(0.002)
        assert lab.proc is not None
        lab.proc.kill()  # SIGKILL by pid, as a crash
        lab.proc.wait()
        t.join(30)
        assert 0 < seen < N, f"the kill was not inside the creates ({seen} of {N} created): lower N or poll faster"

        # Written ahead: every session the kernel holds is in the journal, whose first line holds none of them.
        lines = (state / Journal.NAME).read_text().split("\n")
        docs = [json.loads(line) for line in lines[:-1] if line]  # the last, unterminated line was never acted on
        assert docs[0]["created"] == [] and len(docs) > 2, [len(d["created"]) for d in docs]
        journalled = {tuple(k) for d in docs[1:] for k in d["created"]}
        kernel = _session_keys(lab)
        assert kernel and kernel <= journalled, f"{len(kernel - journalled)} sessions the kernel holds are not journalled"

        lab.start_agent()  # rolls back what it found pending
        assert _session_keys(lab) == set(), "the restarted agent left sessions of the killed commit"
        assert not (state / Journal.NAME).exists()
        client.close()


def _session_keys(lab: AgentLab) -> set:
    """The keys of the translated sessions in the NAT namespace, read with the conntrack tool."""
    from natmig.agent import cttext

    out = lab.conntrack("-L").stdout
    return {s.key for s in cttext.parse_table(out.encode() if isinstance(out, str) else out).sessions}
