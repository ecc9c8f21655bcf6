"""Where the agent listens: --listen is required, and never on the NAT's public or inside side unless forced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from natmig import netns
from natmig.agent.auth import set_password
from natmig.agent.exposure import ListenError, check_listen

from .agent_process import AgentProcess

# A NAT node's namespace as the testbed builds it.
NODE = {
    "lo": {"127.0.0.1"},
    "inside0": {"10.0.0.1"},
    "outside0": {"203.0.113.1", "203.0.113.9"},
    "mgmt0": {"192.0.2.11"},
}


@pytest.mark.parametrize("host,why", [
    ("0.0.0.0", "every address"), ("", "every address"), ("::", "every address"),
    ("203.0.113.1", "public address"), ("203.0.113.9", "public interface outside0"), ("10.0.0.1", "inside interface inside0"),
])
def test_data_plane_addresses_are_refused(host: str, why: str) -> None:
    with pytest.raises(ListenError, match=why) as e:
        check_listen(host, ["203.0.113.1"], "inside0", NODE)
    assert "--listen-anyway" in str(e.value)


@pytest.mark.parametrize("host", ["192.0.2.11", "127.0.0.1", "localhost"])
def test_the_management_address_and_loopback_are_accepted(host: str) -> None:
    check_listen(host, ["203.0.113.1"], "inside0", NODE)


def _agent(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    set_password(tmp_path / "pw", "natmig", "secret")
    argv = [sys.executable, "-m", "natmig.cli", "agent", "--provider", "memory", "--host-key", str(tmp_path / "hk"),
            "--passwords", str(tmp_path / "pw"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_agent_will_not_start_without_listen_or_on_every_address(tmp_path: Path) -> None:
    r = _agent(tmp_path)
    assert r.returncode == 1 and "--listen ADDR[:PORT] is required" in r.stderr and "Traceback" not in r.stderr
    r = _agent(tmp_path, "--listen", "0.0.0.0:0")
    assert r.returncode == 1 and "every address of the node" in r.stderr and "Traceback" not in r.stderr
    r = _agent(tmp_path, "--listen", "127.0.0.1:0", "--public-address", "127.0.0.1")
    assert r.returncode == 1 and "127.0.0.1 is a public address of the NAT" in r.stderr


def test_listen_anyway_overrides_the_check(tmp_path: Path) -> None:
    with AgentProcess(tmp_path, "--listen", "0.0.0.0:0", "--listen-anyway") as a:
        assert a.port > 0
    assert "--listen-anyway: listening on 0.0.0.0" in a.log.read_text()


@pytest.mark.root
def test_in_a_nat_namespace_the_inside_address_is_refused_and_the_management_one_served(tmp_path: Path) -> None:
    ns = netns.run_prefix("lx")
    netns.add(ns)
    try:
        netns.add_veth("inside0", "inside0p", ns, ns)
        netns.add_veth("mgmt0", "mgmt0p", ns, ns)
        netns.run(["ip", "addr", "add", "10.0.0.1/24", "dev", "inside0"], ns)
        netns.run(["ip", "addr", "add", "192.0.2.11/24", "dev", "mgmt0"], ns)
        netns.run(["ip", "link", "set", "mgmt0", "up"], ns)
        r = _agent(tmp_path, "--netns", ns, "--listen", "10.0.0.1:0", "--inside-if", "inside0")
        assert r.returncode == 1 and "10.0.0.1 is an address of the inside interface inside0" in r.stderr, r.stderr
        with AgentProcess(tmp_path / "served", "--netns", ns, "--listen", "192.0.2.11:0", "--inside-if", "inside0") as a:
            assert a.port > 0
    finally:
        netns.delete(ns)
