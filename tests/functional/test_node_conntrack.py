"""`natmig node NAME ...` on a real NAT node: the conntrack provider in a namespace, reached from the inventory's netns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from natmig.agent.lab import USER, AgentLab
from natmig.errors import EXIT_OK

pytestmark = pytest.mark.root

DOC = {"nat-session:nat-session": [
    {"protocol": "TCP", "src_address": "10.0.0.2", "src_port": 4000 + i, "dst_address": "198.51.100.1", "dst_port": 80,
     "translated_address": "203.0.113.1", "translated_port": 24000 + i, "tcp_state": "ESTABLISHED", "timeout": 300}
    for i in range(3)
]}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[AgentLab]:
    with AgentLab(tmp_path / "lab", provider="conntrack", tag="nd") as lab:
        yield lab


def natmig(lab: AgentLab, tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    (tmp / "secret").write_text(lab.password + "\n")
    inv = tmp / "inv.toml"
    inv.write_text(f'[agents.nat1]\nhost = "{lab.mgmt_address}"\nport = {lab.port}\nusername = "{USER}"\n'
                   f'password_file = "{tmp / "secret"}"\nknown_hosts = "{lab.known_hosts}"\nnetns = "{lab.mgmt_ns}"\n')
    cp = subprocess.run([sys.executable, "-m", "natmig.cli", "node", "nat1", *argv, "-i", str(inv)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp


def kernel_ports(lab: AgentLab) -> set[int]:
    """Public ports of the namespace's translated TCP entries, as the kernel lists them."""
    out = set()
    for line in lab.conntrack("-L", "-p", "tcp").stdout.splitlines():
        if "dport=830 " in line or "sport=830 " in line:
            continue
        for tok in line.split():
            if tok.startswith("dport=") and "dst=203.0.113.1" in line:
                out.add(int(tok.split("=")[1]))
    return out


def test_load_admission_and_flush_reach_the_kernel(lab: AgentLab, tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_text(json.dumps(DOC))
    cp = natmig(lab, tmp_path, "load", str(tmp_path / "doc.json"))
    assert cp.returncode == EXIT_OK and "it holds 3" in cp.stdout, cp.stderr
    assert {24000, 24001, 24002} <= kernel_ports(lab)
    st = json.loads(natmig(lab, tmp_path, "status", "--json").stdout)
    assert st["sessions"] == 3 and st["admits"] is True and st["revision"]
    assert natmig(lab, tmp_path, "sessions", "--filter", "src_port=4001", "--count").stdout.strip() == "1"

    assert natmig(lab, tmp_path, "admission", "close").returncode == EXIT_OK
    assert lab.node.admission() is False  # the node's own nftables rule, not only the agent's word
    assert natmig(lab, tmp_path, "admission", "open").returncode == EXIT_OK
    assert lab.node.admission() is True

    cp = natmig(lab, tmp_path, "flush")
    assert cp.returncode == EXIT_OK and "3 session(s) removed; it holds 0" in cp.stdout, cp.stdout + cp.stderr
    assert not {24000, 24001, 24002} & kernel_ports(lab)
