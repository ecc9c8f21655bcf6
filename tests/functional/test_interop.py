"""Third-party NETCONF clients against a real agent: ncclient, netconf-console2, yuma123 yangcli.

Each does get-config, edit-config and get-schema; every edit is checked in the
kernel's conntrack table of the NAT namespace.  yangcli exits 0 even when it
fails, so its output is what is checked.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest
from ncclient import manager

from natmig.agent.lab import AgentLab, call_in_netns
from natmig.codec import NETCONF_NS

pytestmark = pytest.mark.root

NS = "urn:natmig:yang:nat-session"
NCC = str(Path(sys.executable).with_name("netconf-console2"))


def entry(sport: int, pub: int) -> str:
    return (f'<nat-session xmlns="{NS}"><protocol>UDP</protocol><src_address>10.0.0.5</src_address><src_port>{sport}</src_port>'
            f"<dst_address>198.51.100.2</dst_address><dst_port>53</dst_port><translated_address>203.0.113.1</translated_address>"
            f"<translated_port>{pub}</translated_port><timeout>120</timeout></nat-session>")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentLab]:
    with AgentLab(tmp_path_factory.mktemp("interop"), provider="conntrack", tag="fi") as lab:
        yield lab


def in_kernel(lab: AgentLab, sport: int, pub: int) -> bool:
    return any(f"sport={sport} dport=53" in line and f"dport={pub}" in line for line in lab.conntrack("-L").stdout.splitlines())


def test_ncclient(lab: AgentLab) -> None:
    def session():
        return manager.connect(host=lab.mgmt_address, port=lab.port, username="natmig", password=lab.password,
                               hostkey_verify=False, allow_agent=False, look_for_keys=False, timeout=30)

    m = call_in_netns(lab.mgmt_ns, session)
    try:
        assert f"{NS}?module=nat-session&revision=2026-12-03" in list(m.server_capabilities)
        # test-only (ncclient sends it only to a server announcing :validate:1.1) changes nothing.
        m.edit_config(target="running", config=f'<config xmlns="{NETCONF_NS}">{entry(1001, 21001)}</config>', test_option="test-only")
        assert not in_kernel(lab, 1001, 21001)
        m.edit_config(target="running", config=f'<config xmlns="{NETCONF_NS}">{entry(1001, 21001)}</config>')
        assert in_kernel(lab, 1001, 21001)
        m.validate(source="running")
        data = m.get_config(source="running", filter=("subtree", f'<nat-session xmlns="{NS}"><src_port>1001</src_port></nat-session>')).data_xml
        assert "<translated_port>21001</translated_port>" in data
        assert m.get_schema("nat-session").data.startswith("module nat-session")
    finally:
        m.close_session()


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_netconf_console2(lab: AgentLab, tmp_path: Path, version: str) -> None:
    sport, pub = (1002, 21002) if version == "1.0" else (1003, 21003)
    base = [NCC, "--host", lab.mgmt_address, "--port", str(lab.port), "-u", "natmig", "-p", lab.password, "-v", version]
    cfg = tmp_path / "edit.xml"
    cfg.write_text(entry(sport, pub))
    r = lab.cmd(base + ["--edit-config", str(cfg)])
    assert r.returncode == 0 and "<ok" in r.stdout, r.stdout + r.stderr
    assert in_kernel(lab, sport, pub)
    r = lab.cmd(base + ["--ns", f"nats={NS}", "--get-config", "--filter", f"/nats:nat-session[nats:src_port='{sport}']"])
    assert r.returncode == 0 and f"<translated_port>{pub}</translated_port>" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("<nat-session") == 1
    # The whole list: the agent streams this reply in several chunks (1.1) or as it is read (1.0).
    r = lab.cmd(base + ["--ns", f"nats={NS}", "--get-config", "--filter", "/nats:nat-session"])
    assert r.returncode == 0 and f"<translated_port>{pub}</translated_port>" in r.stdout, r.stdout + r.stderr
    r = lab.cmd(base + ["--get-schema", "nat-session"])
    assert r.returncode == 0 and "module nat-session" in r.stdout, r.stdout + r.stderr


def test_netconf_console2_sees_rpc_errors(lab: AgentLab, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.xml"
    cfg.write_text(entry(1004, 70000))
    r = lab.cmd([NCC, "--host", lab.mgmt_address, "--port", str(lab.port), "-u", "natmig", "-p", lab.password, "--edit-config", str(cfg)])
    assert "<error-tag>invalid-value</error-tag>" in r.stdout and "translated_port" in r.stdout
    assert not in_kernel(lab, 1004, 70000)


def test_yangcli(lab: AgentLab, tmp_path: Path) -> None:
    yangcli = shutil.which("yangcli")
    assert yangcli, "yangcli (Debian package yangcli) is not installed"
    cfg = tmp_path / "y.xml"
    cfg.write_text(entry(1005, 21005))
    script = tmp_path / "y.script"
    script.write_text(
        f"edit-config target=running config=@{cfg}\n"
        "get-config source=running\n"
        "get-schema identifier=nat-session version=2026-12-03 format=yang\n"
    )
    r = lab.cmd([yangcli, f"--server={lab.mgmt_address}", f"--ncport={lab.port}", "--user=natmig", f"--password={lab.password}",
                 "--batch-mode", f"--run-script={script}", f"--home={tmp_path}"], timeout=90)
    out = r.stdout + r.stderr
    assert "NETCONF session established" in out, out
    assert "RPC OK Reply" in out and "RPC Error" not in out and "canceled" not in out, out
    assert "translated_port 21005" in out, out  # get-config, in yangcli's own rendering
    assert "module nat-session {" in out, out  # get-schema
    assert in_kernel(lab, 1005, 21005)
