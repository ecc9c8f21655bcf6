"""natmig.ofctl, the one ovs-ofctl wrapper, and the steering over it, against a stand-in ovs-ofctl (no root, no switch).

The stand-in records its arguments, OVS_RUNDIR and what it was given (stdin,
or the bundle file), and prints a canned reply; the real tool is exercised by
the functional tests (tests/functional/test_testbed.py, test_migrate.py).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from natmig.controller.plan import NatPorts, SwitchLayout, static_flows, steering_flows
from natmig.controller.steering import OvsSteering, SteeringError
from natmig.errors import TestbedError
from natmig.netns import CommandError
from natmig.ofctl import Ofctl, PortStats
from natmig.testbed.ovs import Ovs

FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
given = sys.stdin.read() if "-" in args else ""
for a in args:
    if a.endswith(".txt") and os.path.exists(a):
        given = open(a).read()
with open({log!r}, "a") as f:
    f.write(json.dumps({{"args": args, "rundir": os.environ.get("OVS_RUNDIR"), "given": given}}) + "\\n")
reply = os.environ.get("FAKE_OFCTL_REPLY", "")
if reply == "fail":
    sys.stderr.write("ovs-ofctl: br0 is not a bridge or a socket\\n")
    sys.exit(1)
sys.stdout.write(reply)
"""

DUMP = """OFPST_FLOW reply (OF1.4) (xid=0x2):
 cookie=0x6e6d, priority=100,in_port=1 actions=output:5
 cookie=0x6e6d, priority=0 actions=drop
"""

PORTS = """OFPST_PORT reply (OF1.4) (xid=0x2): 2 ports
  port  5: rx pkts=7, bytes=686, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=9, bytes=882, drop=0, errs=0, coll=0
  port LOCAL: rx pkts=0, bytes=0, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=0, bytes=0, drop=0, errs=0, coll=0
"""

LAYOUT = SwitchLayout("br0", 1, 2, {"nat1": NatPorts(3, 4), "nat2": NatPorts(5, 6)})


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in ovs-ofctl first on PATH; the file its calls are logged to (one JSON a line)."""
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    tool = bindir / "ovs-ofctl"
    tool.write_text(FAKE.format(python=sys.executable, log=str(log)))
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_bundle_of_adds_is_read_from_a_file_and_the_rundir_is_passed(calls: Path) -> None:
    Ofctl("br0", "/run/x").add_flows(["priority=1,actions=drop", "priority=2,in_port=1,actions=output:2"])
    (c,) = _calls(calls)
    assert c["args"][:4] == ["--no-names", "--bundle", "add-flows", "br0"] and c["rundir"] == "/run/x"
    assert c["given"] == "add priority=1,actions=drop\nadd priority=2,in_port=1,actions=output:2\n"
    assert not Path(c["args"][4]).exists()  # the temporary file is gone


def test_replace_flows_is_one_bundle_from_a_whole_file_never_stdin_in_the_chosen_version(calls: Path) -> None:
    # From a pipe, a controller killed mid-write leaves ovs-ofctl a truncated
    # table to install as the switch's whole one; a file is whole before it starts.
    Ofctl("br0", version="OpenFlow14").replace_flows(["a", "b"])
    (c,) = _calls(calls)
    assert c["args"][:6] == ["-O", "OpenFlow14", "--no-names", "--bundle", "replace-flows", "br0"] and c["given"] == "a\nb\n"
    assert "-" not in c["args"] and not Path(c["args"][6]).exists()
    assert c["rundir"] is None or c["rundir"] == os.environ.get("OVS_RUNDIR")


def test_a_dump_is_its_flow_lines(calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OFCTL_REPLY", DUMP)
    assert Ofctl("br0").dump_flows("in_port=1") == ["cookie=0x6e6d, priority=100,in_port=1 actions=output:5", "cookie=0x6e6d, priority=0 actions=drop"]
    assert _calls(calls)[0]["args"] == ["--no-names", "--no-stats", "dump-flows", "br0", "in_port=1"]


def test_port_counters(calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OFCTL_REPLY", PORTS)
    assert Ofctl("br0").port_stats() == {5: PortStats(7, 9, 686, 882)}


def test_a_failure_carries_the_tool_s_words(calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OFCTL_REPLY", "fail")
    with pytest.raises(CommandError, match="exited 1: ovs-ofctl: br0 is not a bridge"):
        Ofctl("br0").dump_flows()


def test_ovs_steering_installs_and_moves_in_one_bundle_each_and_reads_the_active_nat_back(calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steer = OvsSteering(LAYOUT, "/run/ovs")
    steer.install("nat1")
    steer.point_to("nat2")
    installed, moved = _calls(calls)
    assert installed["given"].splitlines() == [f"add {f}" for f in static_flows(LAYOUT) + steering_flows(LAYOUT, "nat1")]
    assert moved["given"].splitlines() == [f"add {f}" for f in steering_flows(LAYOUT, "nat2")]
    assert installed["rundir"] == moved["rundir"] == "/run/ovs"
    monkeypatch.setenv("FAKE_OFCTL_REPLY", DUMP)
    assert steer.active() == "nat2"
    assert _calls(calls)[-1]["args"][-1] == "in_port=1"
    monkeypatch.setenv("FAKE_OFCTL_REPLY", "OFPST_FLOW reply (OF1.4) (xid=0x2):\n")
    assert steer.active() is None


def test_ovs_steering_errors_name_the_bridge(calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OFCTL_REPLY", "fail")
    with pytest.raises(SteeringError, match="bridge br0: .*not a bridge"):
        OvsSteering(LAYOUT).point_to("nat2")


def test_the_testbed_switch_speaks_openflow_1_4_to_its_own_daemons_and_fails_as_the_testbed(calls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ovs = Ovs(tmp_path / "ovs")
    ovs.replace_flows("br0", "a\nb\n")
    (c,) = _calls(calls)
    assert c["args"][:2] == ["-O", "OpenFlow14"] and c["rundir"] == str(ovs.rundir) and c["given"] == "a\nb\n"
    monkeypatch.setenv("FAKE_OFCTL_REPLY", "fail")
    with pytest.raises(TestbedError, match="not a bridge"):
        ovs.dump_flows("br0")
