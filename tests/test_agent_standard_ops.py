"""Standard operations of the NAT agent over SSH: with-defaults modes (RFC 6243), copy-config and delete-config (RFC 6241 7.3, 7.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations import RPCError

from natmig.codec import NETCONF_NS, default_codec
from natmig.model import NatSession

from .test_agent_ssh import RunningAgent

WD = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"


def S(port: int, assured: bool = False) -> NatSession:
    return NatSession("TCP", "10.0.0.2", port, "198.51.100.1", 80, "203.0.113.1", 20000 + port, "ESTABLISHED", 300, assured)


def config(*sessions: NatSession) -> str:
    return f'<config xmlns="{NETCONF_NS}">{default_codec().encode_xml(sessions, root=None).decode()}</config>'


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    a = RunningAgent(tmp_path)
    try:
        yield a
    finally:
        a.stop()


def rpc(m: manager.Manager, body: str) -> str:
    """Any operation as XML text, through ncclient's dispatch (a third-party client's own path)."""
    return m.dispatch(etree.fromstring(body)).xml


def get_config(m: manager.Manager, mode: str | None = None) -> str:
    wd = f'<with-defaults xmlns="{WD}">{mode}</with-defaults>' if mode else ""
    return rpc(m, f'<get-config xmlns="{NETCONF_NS}"><source><running/></source>{wd}</get-config>')


def copy_config(m: manager.Manager, source: str, target: str) -> str:
    src = source if source.startswith("<config") else f"<{source}/>"
    return rpc(m, f'<copy-config xmlns="{NETCONF_NS}"><target><{target}/></target><source>{src}</source></copy-config>')


def test_with_defaults_modes(agent: RunningAgent) -> None:
    m = agent.ncclient()
    try:
        m.edit_config(target="running", config=config(S(1), S(2, assured=True)))
        trim = get_config(m)
        assert "<assured>" not in trim.replace("<assured>true</assured>", "")  # the default false is left out
        full = get_config(m, "report-all")
        assert full.count("<assured>false</assured>") == 1 and full.count("<mark>0</mark>") == 2
        explicit = get_config(m, "explicit")
        assert explicit.count("<mark>0</mark>") == 2  # a live table's leaves are all set: as report-all
        tagged = get_config(m, "report-all-tagged")
        # at their default: assured false once, mark 0 and tcp_state ESTABLISHED twice, both admission leaves
        assert tagged.count('wd:default="true"') == 7
        assert 'xmlns:wd="urn:ietf:params:xml:ns:netconf:default:1.0"' in tagged
        with pytest.raises(RPCError, match="supports trim, report-all, report-all-tagged, explicit"):
            get_config(m, "sometimes")
        assert any("also-supported=report-all,report-all-tagged,explicit" in c for c in m.server_capabilities)
    finally:
        m.close_session()


def test_copy_config_and_delete_config(agent: RunningAgent) -> None:
    m = agent.ncclient()
    try:
        m.edit_config(target="running", config=config(S(1), S(2)))
        # inline config replaces running whole
        copy_config(m, config(S(3)), "running")
        assert {s.src_port for s in agent.provider.list().sessions} == {3}
        # running -> candidate, then candidate -> running after a candidate edit
        copy_config(m, "running", "candidate")
        m.edit_config(target="candidate", config=config(S(4)))
        copy_config(m, "candidate", "running")
        assert {s.src_port for s in agent.provider.list().sessions} == {3, 4}
        # delete-config empties the candidate; running cannot be deleted
        m.delete_config(target="candidate")
        assert "nat-session" not in m.get_config("candidate").data_xml
        with pytest.raises(RPCError, match="running cannot be deleted"):
            m.delete_config(target="running")
        with pytest.raises(RPCError, match="onto itself"):
            copy_config(m, "running", "running")
        assert {s.src_port for s in agent.provider.list().sessions} == {3, 4}
    finally:
        m.close_session()
