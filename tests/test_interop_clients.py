"""Third-party NETCONF clients against the agent over SSH on loopback: scrapli-netconf (paramiko and system
transports) and netconf-client 3.6, beside ncclient, netconf-console2 and yangcli (tests/functional/test_interop.py).

Each connects with the host key checked where the client can, then: get-config, a filtered get,
edit-config into the candidate, lock/unlock, commit, get-schema, and a notification where the
client can receive one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
from lxml import etree

from natmig.codec import NETCONF_NS, default_codec
from natmig.model import NatSession

from .test_agent_ssh import RunningAgent

NS = "urn:natmig:yang:nat-session"


def S(port: int) -> NatSession:
    return NatSession("TCP", "10.0.0.2", port, "198.51.100.1", 80, "203.0.113.1", 20000 + port, "ESTABLISHED", 300)


def entries(*sessions: NatSession) -> str:
    return default_codec().encode_xml(sessions, root=None).decode()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    a = RunningAgent(tmp_path)
    # Plain known_hosts lines too: scrapli's paramiko transport looks the host up without the port.
    pub = (tmp_path / "host_key.pub").read_text().split()
    with (tmp_path / "known_hosts").open("a") as f:
        f.write(f"127.0.0.1 {pub[0]} {pub[1]}\n")
    try:
        yield a
    finally:
        a.stop()


@pytest.mark.parametrize("transport", ["paramiko", "system"])
def test_scrapli_netconf(agent: RunningAgent, transport: str) -> None:
    from scrapli_netconf.driver import NetconfDriver

    # The system transport runs OpenSSH's ssh, which asks for a PTY (-tt) unless told not to; the
    # agent grants the request without a terminal (nothing is echoed or translated), so bytes pass
    # as they are.  It signs in with the key: ssh would prompt for a password on a terminal.
    auth = ({"auth_password": "secret"} if transport == "paramiko"
            else {"auth_private_key": str(agent.tmp / "id_ed25519")})
    d = NetconfDriver(host="127.0.0.1", port=agent.port, auth_username="natmig", auth_strict_key=True,
                      ssh_known_hosts_file=str(agent.tmp / "known_hosts"), transport=transport, timeout_ops=20, **auth)
    d.open()
    try:
        assert any("nat-session" in c for c in d.server_capabilities)
        assert not d.lock(target="candidate").failed
        assert not d.edit_config(config=f"<config>{entries(S(1), S(2))}</config>", target="candidate").failed
        assert not d.commit().failed
        assert not d.unlock(target="candidate").failed
        r = d.get_config(source="running")
        assert not r.failed and r.result.count("<src_port>") == 2
        r = d.get(filter_=f'<nat-session xmlns="{NS}"><src_port>2</src_port></nat-session>')
        assert not r.failed and "<src_port>2</src_port>" in r.result and "<src_port>1</src_port>" not in r.result
        r = d.rpc(filter_=f'<get-schema xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"><identifier>nat-session</identifier></get-schema>')
        assert not r.failed and "module nat-session" in r.result
        assert {s.src_port for s in agent.provider.list().sessions} == {1, 2}
    finally:
        d.close()


def test_netconf_client(agent: RunningAgent) -> None:
    import socket

    import paramiko
    from netconf_client.connect import SshSessionSock
    from netconf_client.ncclient import Manager
    from netconf_client.session import Session

    # netconf-client's connect_ssh loads a given host key but never checks it (../shared/FIELD-NOTES.md):
    # the SSH transport is made here, with the agent's key required, and handed to its Session.
    kind, blob = (agent.tmp / "host_key.pub").read_text().split()[:2]
    hostkey = paramiko.PKey.from_type_string(kind, __import__("base64").b64decode(blob))
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=20)
    transport = paramiko.Transport(sock)
    transport.connect(hostkey=hostkey, username="natmig", password="secret")
    channel = transport.open_session(timeout=20)
    channel.invoke_subsystem("netconf")
    with Manager(Session(SshSessionSock(sock, transport, channel)), timeout=20) as m:
        m.lock(target="candidate")
        m.edit_config(config=f'<config xmlns="{NETCONF_NS}">{entries(S(1))}</config>', target="candidate")
        m.commit()
        m.unlock(target="candidate")
        assert b"<src_port>1</src_port>" in m.get_config(source="running").data_xml  # netconf-client gives bytes
        got = m.get(filter=f'<filter><nat-session xmlns="{NS}"><src_port>1</src_port></nat-session></filter>').data_xml
        assert b"<translated_port>20001</translated_port>" in got
        m.create_subscription()
        with agent.client() as c:  # another session's write makes an event
            c.edit_sessions([S(7)], target="running")
        deadline = time.monotonic() + 10
        note = None
        while note is None and time.monotonic() < deadline:
            note = m.take_notification(block=True, timeout=1)
        assert note is not None and b"nat-session-event" in etree.tostring(note.notification_ele)
