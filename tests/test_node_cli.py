"""`natmig node NAME ...` against a real agent process (MemoryProvider, loopback), as an operator runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from natmig.agent.auth import set_password
from natmig.codec import default_codec
from natmig.controller.netconf import NodeClient
from natmig.errors import EXIT_FAILED, EXIT_OK

DOC = {"nat-session:nat-session": [
    {"protocol": "TCP", "src_address": "10.0.0.2", "src_port": 1000 + i, "dst_address": "198.51.100.1", "dst_port": 80 if i % 2 else 443,
     "translated_address": "203.0.113.1", "translated_port": 20000 + i, "tcp_state": "ESTABLISHED", "timeout": 300}
    for i in range(4)
] + [{"protocol": "UDP", "src_address": "10.0.0.3", "src_port": 53, "dst_address": "198.51.100.2", "dst_port": 53,
      "translated_address": "203.0.113.1", "translated_port": 30000, "timeout": 30}]}


class AgentProcess:
    """`natmig agent --provider memory` on 127.0.0.1 (a free port), and an inventory naming it nat1."""

    def __init__(self, tmp: Path, public: str = "203.0.113.1") -> None:
        self.tmp = tmp
        set_password(tmp / "agent.passwords", "natmig", "secret")   # the agent's hashed file
        (tmp / "nat1.secret").write_text("secret\n")                  # the controller's plaintext secret
        ready = tmp / "ready"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "natmig.cli", "agent", "--provider", "memory", "--listen", "127.0.0.1:0",
             "--public-address", public, "--passwords", str(tmp / "agent.passwords"),
             "--host-key", str(tmp / "host_key"), "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "w"))
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().endswith("\n")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent did not start: {(tmp / 'agent.log').read_text()}")
            time.sleep(0.05)
        self.port = int(ready.read_text().split()[1])
        kind, key = (tmp / "host_key.pub").read_text().split()[:2]
        (tmp / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {kind} {key}\n")
        self.inventory = tmp / "inv.toml"
        self.inventory.write_text(
            f'[agents.nat1]\nhost = "127.0.0.1"\nport = {self.port}\npassword_file = "{tmp / "nat1.secret"}"\n'
            f'known_hosts = "{tmp / "known_hosts"}"\n')

    def natmig(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "natmig.cli", "node", "nat1", *argv], input=stdin,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "NATMIG_INVENTORY": str(self.inventory)})
        assert "Traceback" not in cp.stderr, cp.stderr
        return cp

    def client(self) -> NodeClient:
        return NodeClient.connect("127.0.0.1", self.port, "natmig", password="secret", known_hosts=str(self.tmp / "known_hosts"), timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path)
    try:
        yield a
    finally:
        a.stop()


def test_status_of_a_fresh_node(agent: AgentProcess) -> None:
    cp = agent.natmig("status")
    assert cp.returncode == EXIT_OK, cp.stderr
    assert f"revision {default_codec().schema.revision}" in cp.stdout
    assert "0 translated" in cp.stdout and "open (admits new sessions)" in cp.stdout and "locks:         none" in cp.stdout
    st = json.loads(agent.natmig("status", "--json").stdout)
    assert st["sessions"] == 0 and st["admits"] is True and st["locks"] == [] and st["digest"]


def test_load_list_filter_and_flush(agent: AgentProcess, tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_text(json.dumps(DOC))
    cp = agent.natmig("load", str(tmp_path / "doc.json"))
    assert cp.returncode == EXIT_OK and "5 session(s) merged; it holds 5" in cp.stdout, cp.stderr
    lines = agent.natmig("sessions").stdout.splitlines()
    assert len(lines) == 5 and "TCP  10.0.0.2:1001 -> 198.51.100.1:80 as 203.0.113.1:20001 ESTABLISHED timeout=" in "\n".join(lines)
    assert agent.natmig("sessions", "--filter", "dst_port=80", "--filter", "protocol=TCP", "--count").stdout.strip() == "2"
    assert agent.natmig("sessions", "--filter", "protocol=UDP", "--count").stdout.strip() == "1"
    # --json is what load reads: the same table comes back (XML this time).
    dumped = agent.natmig("sessions", "--json").stdout
    assert {(s["src_port"], s["translated_port"]) for s in json.loads(dumped)["nat-session:nat-session"]} == \
        {(s["src_port"], s["translated_port"]) for s in DOC["nat-session:nat-session"]}
    xml = subprocess.run([sys.executable, "-m", "natmig.cli", "convert", "-", "--to", "xml"], input=dumped, capture_output=True, text=True).stdout
    cp = agent.natmig("load", "-", "--replace", stdin=xml)
    assert cp.returncode == EXIT_OK and "holds 5" in cp.stdout, cp.stderr
    st = json.loads(agent.natmig("status", "--json").stdout)
    assert st["sessions"] == 5
    cp = agent.natmig("flush")
    assert cp.returncode == EXIT_OK and "5 session(s) removed; it holds 0" in cp.stdout


def test_a_refused_document_changes_nothing_and_names_the_entry(agent: AgentProcess, tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_text(json.dumps(DOC))
    agent.natmig("load", str(tmp_path / "doc.json"))
    bad = json.loads(json.dumps(DOC))
    bad["nat-session:nat-session"][0]["translated_port"] = 29999   # a new mapping, fine alone
    bad["nat-session:nat-session"][1]["translated_port"] = 30000   # the UDP session's public port... for TCP: fine
    bad["nat-session:nat-session"].append(dict(bad["nat-session:nat-session"][2], src_port=5000))  # same public port twice
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cp = agent.natmig("load", str(tmp_path / "bad.json"))
    assert cp.returncode == EXIT_FAILED
    assert "nat-session[TCP 10.0.0.2 5000 198.51.100.1 80]" in cp.stderr or "nat-session[TCP 10.0.0.2 1002" in cp.stderr, cp.stderr
    # All or nothing: the first entry's new port was not written either.
    assert "as 203.0.113.1:20000 " in agent.natmig("sessions", "--filter", "src_port=1000").stdout


def test_admission_and_a_lock_holder_named(agent: AgentProcess) -> None:
    cp = agent.natmig("admission", "close")
    assert cp.returncode == EXIT_OK and "CLOSED" in cp.stdout, cp.stderr
    assert "CLOSED (new sessions are held)" in agent.natmig("status").stdout
    assert "open" in agent.natmig("admission", "open").stdout
    with agent.client() as holder:
        holder.lock("running")
        st = agent.natmig("status")
        assert f"running locked by session {holder.session_id} (natmig@127.0.0.1" in st.stdout, st.stdout
        cp = agent.natmig("admission", "close")
        assert cp.returncode == EXIT_FAILED
        assert f"session {holder.session_id}" in cp.stderr and cp.stderr.startswith("natmig node: error:"), cp.stderr
    assert json.loads(agent.natmig("status", "--json").stdout)["admits"] is True


def test_a_wrong_host_key_is_refused(agent: AgentProcess, tmp_path: Path) -> None:
    import asyncssh

    other = asyncssh.generate_private_key("ecdsa-sha2-nistp256").export_public_key("openssh").decode().split()[:2]
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{agent.port} {' '.join(other)}\n")
    cp = agent.natmig("status")
    assert cp.returncode == EXIT_FAILED and "host key" in cp.stderr


def test_an_agent_given_its_ports_refuses_a_session_outside_them_and_writes_nothing(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path, public="203.0.113.1:20000-20003")
    try:
        doc = {"nat-session:nat-session": DOC["nat-session:nat-session"][:4]}   # ports 20000-20003: the node's
        (tmp_path / "doc.json").write_text(json.dumps(doc))
        cp = a.natmig("load", str(tmp_path / "doc.json"))
        assert cp.returncode == EXIT_OK and "holds 4" in cp.stdout, cp.stderr
        (tmp_path / "all.json").write_text(json.dumps(DOC))                   # and the UDP session at 30000
        cp = a.natmig("load", str(tmp_path / "all.json"), "--replace")
        assert cp.returncode == EXIT_FAILED
        assert "nat-session[UDP 10.0.0.3 53 198.51.100.2 53]" in cp.stderr, cp.stderr
        assert "translated_port 30000 is outside the ports of 203.0.113.1 on this node (20000-20003)" in cp.stderr, cp.stderr
        assert json.loads(a.natmig("status", "--json").stdout)["sessions"] == 4
    finally:
        a.stop()
