"""The agent over real SSH on loopback (MemoryProvider): hello, framings, auth, sessions, limits.

The agent runs in this process on its own event loop thread; clients are
ncclient (through NodeClient) and a raw asyncssh channel for what ncclient
cannot do (base:1.0 framing, broken input, vanishing mid-message).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest
from ncclient import manager
from ncclient.operations import RPCError

from natmig.agent.auth import set_password
from natmig.agent.confirmed import Journal, Record, Undo
from natmig.framing import EOM, frame
from natmig.agent.provider import MemoryProvider
from natmig.agent.server import Agent, AgentConfig
from natmig.codec import NETCONF_NS, default_codec
from natmig.controller.ncerrors import ConnectError, HostKeyError, NetconfError, SessionLost
from natmig.controller.netconf import NodeClient
from natmig.model import NatSession, table_digest

CLIENT_HELLO_10 = f'<hello xmlns="{NETCONF_NS}"><capabilities><capability>urn:ietf:params:netconf:base:1.0</capability></capabilities></hello>'.encode()


def S(port: int) -> NatSession:
    return NatSession("TCP", "10.0.0.2", port, "198.51.100.1", 80, "203.0.113.1", 20000 + port, "ESTABLISHED", 300)


class RunningAgent:
    """An Agent on 127.0.0.1 (free port) served by a private event loop thread."""

    def __init__(self, tmp: Path, provider: MemoryProvider | None = None, **limits: object) -> None:
        set_password(tmp / "passwords", "natmig", "secret")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        (tmp / "id_ed25519").write_bytes(self.client_key.export_private_key("openssh"))
        (tmp / "id_ed25519").chmod(0o600)
        (tmp / "authorized_keys.natmig").write_bytes(self.client_key.export_public_key())
        cfg = AgentConfig(host="127.0.0.1", port=0, host_key=str(tmp / "host_key"), passwords=str(tmp / "passwords"), authorized_keys=str(tmp / "authorized_keys.%u"), **limits)
        self.provider = provider or MemoryProvider(owned={"203.0.113.1"})
        self.agent = Agent(cfg, self.provider, default_codec())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(10)
        self.port = self.agent.port
        self.tmp = tmp
        pub = (tmp / "host_key.pub").read_text().split()
        (tmp / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")

    def ncclient(self) -> manager.Manager:
        """A plain ncclient session (what a third-party client does), no NodeClient in between."""
        return manager.connect(host="127.0.0.1", port=self.port, username="natmig", password="secret", hostkey_verify=False,
                               look_for_keys=False, allow_agent=False, timeout=10)

    def client(self, **kw: object) -> NodeClient:
        kw.setdefault("password", "secret")
        return NodeClient.connect("127.0.0.1", self.port, "natmig", known_hosts=str(self.tmp / "known_hosts"), timeout=10, **kw)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.agent.close)
        time.sleep(0.1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    a = RunningAgent(tmp_path)
    try:
        yield a
    finally:
        a.stop()


async def _raw(port: int, chunks: list[bytes], read_for: float = 1.0, hello: bytes = CLIENT_HELLO_10) -> bytes:
    """Send a hello and ``chunks`` over a raw netconf channel; everything the agent sent back."""
    async with asyncssh.connect("127.0.0.1", port, username="natmig", password="secret", known_hosts=None) as conn:
        proc = await conn.create_process(subsystem="netconf", encoding=None)
        proc.stdin.write(hello + EOM)
        for c in chunks:
            proc.stdin.write(c)
        out = b""
        end = time.monotonic() + read_for
        while time.monotonic() < end:
            try:
                data = await asyncio.wait_for(proc.stdout.read(1 << 16), end - time.monotonic())
            except asyncio.TimeoutError:
                break
            if not data:
                break
            out += data
        proc.close()
        return out


def raw(port: int, chunks: list[bytes], **kw: object) -> bytes:
    return asyncio.run(_raw(port, chunks, **kw))


def rpc(body: str, mid: int = 1) -> bytes:
    return f'<rpc xmlns="{NETCONF_NS}" message-id="{mid}">{body}</rpc>'.encode()


def test_base10_end_of_message_framing(agent: RunningAgent) -> None:
    agent.provider.apply([S(1)])
    out = raw(agent.port, [rpc("<get-config><source><running/></source></get-config>") + EOM])
    hello, reply, *_ = out.split(EOM)
    assert b"urn:ietf:params:netconf:base:1.1" in hello and b"<session-id>" in hello
    assert b"<src_port>1</src_port>" in reply and b'message-id="1"' in reply


def test_base11_chunked_framing_with_a_raw_client(agent: RunningAgent) -> None:
    hello11 = CLIENT_HELLO_10.replace(b"netconf:base:1.0</capability>", b"netconf:base:1.1</capability>")
    out = raw(agent.port, [frame(rpc("<get/>"), True)], hello=hello11)
    assert out.split(EOM, 1)[1].startswith(b"\n#")
    assert b"<nat-statistics" in out


def test_ncclient_session_and_typed_client(agent: RunningAgent) -> None:
    with agent.client() as c:
        assert c.check_module() == "2026-12-03"
        assert c.has_candidate()
        c.edit_sessions([S(1), S(2)], target="running")
        assert sorted(s.src_port for s in c.get_sessions()) == [1, 2]
        assert c.get_sessions(key=S(2).key) == [S(2)]
        c.edit_sessions([S(3)], target="candidate")
        assert len(c.get_sessions("candidate")) == 3 and len(c.get_sessions()) == 2
        c.commit()
        assert len(c.get_sessions()) == 3
        c.replace_table([S(4)], target="running")
        assert c.get_sessions() == [S(4)]
        c.delete_sessions(None, target="running")
        assert c.get_sessions() == []
        c.set_admission(False)
        assert c.get_admission() is False and agent.provider.admission() is False
        assert c.get_statistics() == {"sessions": 0, "untranslated": 0, "digest": table_digest([])}
        assert "module nat-session" in c.get_schema()


def test_the_controllers_session_encrypts_with_aes_gcm(agent: RunningAgent) -> None:
    # One AEAD pass instead of AES-CTR and an HMAC: what a migration's table costs both ends (controller/ncpatch.py).
    with agent.client() as c:
        transport = c._mgr._session._transport
        assert (transport.local_cipher, transport.remote_cipher) == ("aes128-gcm@openssh.com",) * 2


def test_rpc_error_is_typed_and_session_stays_usable(agent: RunningAgent) -> None:
    with agent.client() as c:
        c.edit_sessions([S(1)], target="running")
        with pytest.raises(NetconfError) as e:
            c.edit_sessions([S(1)], target="running", operation="create")
        assert e.value.tag == "data-exists" and e.value.severity == "error"
        assert "nat-session[TCP 10.0.0.2 1" in (e.value.message or "")
        assert e.value.path and e.value.path.startswith("/nats:nat-session[")
        assert c.get_sessions() == [S(1)]


def test_wrong_password_and_unknown_key_are_refused(agent: RunningAgent, tmp_path: Path) -> None:
    with pytest.raises(ConnectError):
        agent.client(password="wrong")
    other = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "other").write_bytes(other.export_private_key("openssh"))
    with pytest.raises(ConnectError):
        agent.client(password=None, key_filename=str(tmp_path / "other"))


def test_public_key_authentication(agent: RunningAgent) -> None:
    with agent.client(password=None, key_filename=str(agent.tmp / "id_ed25519")) as c:
        assert c.get_sessions() == []


def test_wrong_host_key_is_refused_before_anything_is_sent(agent: RunningAgent, tmp_path: Path) -> None:
    impostor = asyncssh.generate_private_key("ecdsa-sha2-nistp256").export_public_key().decode().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{agent.port} {impostor[0]} {impostor[1]}\n")
    with pytest.raises(HostKeyError, match="not the known key"):
        agent.client()
    assert agent.agent.sessions == {}


def test_lock_held_by_one_session_blocks_the_other(agent: RunningAgent) -> None:
    with agent.client() as a, agent.client() as b:
        a.lock("running")
        with pytest.raises(NetconfError) as e:
            b.lock("running")
        assert e.value.tag == "lock-denied" and str(a.session_id) in (e.value.info or "")
        # The holder is named: user, address and login time.
        assert re.search(rf"running is locked by session {a.session_id} \(natmig@127\.0\.0\.1, since \d\d:\d\d:\d\d UTC\)", e.value.message or "")
        with pytest.raises(NetconfError) as e:
            b.edit_sessions([S(1)], target="running")
        assert e.value.tag == "in-use"
        a.edit_sessions([S(1)], target="running")
        a.unlock("running")
        b.edit_sessions([S(2)], target="running")
        assert len(agent.provider.table) == 2


def test_kill_session_ends_the_other_session_and_frees_its_lock(agent: RunningAgent) -> None:
    with agent.client() as a, agent.client() as b:
        b.lock("candidate")
        a.kill_session(b.session_id)
        deadline = time.monotonic() + 5
        while b.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(SessionLost):
            b.get_sessions()
        a.lock("candidate")


def test_notifications_of_created_and_destroyed_sessions(agent: RunningAgent) -> None:
    with agent.client() as listener, agent.client() as writer:
        sub = listener.subscribe()
        writer.edit_sessions([S(1)], target="running")
        writer.delete_sessions([S(1).key], target="running")
        got = [sub.get(timeout=5), sub.get(timeout=5)]
        assert got == [("created", S(1)), ("destroyed", S(1))]
        # Interleave: RPCs still work on a subscribed session.
        assert listener.get_sessions() == []


def test_malformed_message_gets_an_error_and_the_session_goes_on(agent: RunningAgent) -> None:
    out = raw(agent.port, [b"<rpc><oops>" + EOM, rpc("<get/>", 2) + EOM])
    msgs = out.split(EOM)
    assert b"malformed-message" in msgs[1]
    assert b'message-id="2"' in msgs[2] and b"<data>" in msgs[2]


def test_client_vanishing_mid_message_does_not_disturb_others(agent: RunningAgent) -> None:
    with agent.client() as c:
        c.edit_sessions([S(1)], target="running")
        raw(agent.port, [b'<rpc xmlns="' + NETCONF_NS.encode() + b'" message-id="1"><edit-config><target><running/></target><config>'], read_for=0.2)
        time.sleep(0.2)
        assert c.get_sessions() == [S(1)]
        assert len(agent.agent.sessions) == 1


def test_limits_message_size_and_session_count(tmp_path: Path) -> None:
    a = RunningAgent(tmp_path, max_message=4096, max_sessions=2)
    try:
        out = raw(a.port, [b"<rpc>" + b" " * 5000], read_for=1.0)
        assert b"too-big" in out
        with a.client(), a.client():
            with pytest.raises(ConnectError):
                a.client()
    finally:
        a.stop()


def test_idle_sessions_are_closed(tmp_path: Path) -> None:
    a = RunningAgent(tmp_path, idle_timeout=0.5)
    try:
        t0 = time.monotonic()
        out = raw(a.port, [], read_for=5.0)
        assert b"<hello" in out and time.monotonic() - t0 < 3.0  # the agent closed it
    finally:
        a.stop()


def _candidate_edit(sessions: list[NatSession]) -> str:
    entries = default_codec().encode_xml(sessions, root=None).decode()
    return f'<config xmlns="{NETCONF_NS}">{entries}</config>'


def _wait(cond, within: float = 5.0) -> None:  # noqa: ANN001 - test helper
    end = time.monotonic() + within
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_confirmed_commit_with_persist_confirmed_and_cancelled_from_other_ncclient_sessions(agent: RunningAgent) -> None:
    agent.provider.apply([S(1)])
    assert "urn:ietf:params:netconf:capability:confirmed-commit:1.1" in agent.agent.catalog.capabilities
    with agent.ncclient() as m1:
        m1.edit_config(target="candidate", config=_candidate_edit([S(2)]))
        m1.commit(confirmed=True, timeout="2", persist="x")
        assert S(2).key in agent.provider.table
    # The issuing session is gone; with persist, the commit waits for its confirmation.
    time.sleep(0.2)
    assert agent.agent.datastore.pending_commit() is not None and S(2).key in agent.provider.table
    with agent.ncclient() as m2:
        with pytest.raises(RPCError) as e:
            m2.commit(persist_id="y")
        assert e.value.tag == "invalid-value" and "does not match" in e.value.message
        m2.commit(persist_id="x")  # confirms
        assert agent.agent.datastore.pending_commit() is None
        time.sleep(2.3)  # past the timeout: confirmed, nothing rolled back
        assert set(agent.provider.table) == {S(1).key, S(2).key}
        # A second series, cancelled by a third session.
        m2.edit_config(target="candidate", config=_candidate_edit([S(3)]))
        m2.commit(confirmed=True, timeout="60", persist="z")
    with agent.ncclient() as m3:
        with pytest.raises(RPCError) as e:
            m3.cancel_commit()
        assert e.value.tag == "invalid-value" and "persist-id" in e.value.message
        m3.cancel_commit(persist_id="z")
    assert set(agent.provider.table) == {S(1).key, S(2).key}


def test_confirmed_commit_without_persist_times_out_or_ends_with_its_session(agent: RunningAgent) -> None:
    agent.provider.apply([S(1)])
    m1 = agent.ncclient()
    with agent.ncclient() as m2:
        m1.edit_config(target="candidate", config=_candidate_edit([S(2)]))
        m1.commit(confirmed=True, timeout="1")
        with pytest.raises(RPCError) as e:
            m2.commit()
        assert e.value.tag == "in-use" and f"session {m1.session_id} (natmig@127.0.0.1" in e.value.message
        _wait(lambda: S(2).key not in agent.provider.table, 3.0)  # the timeout
        m1.edit_config(target="candidate", config=_candidate_edit([S(3)]))
        m1.commit(confirmed=True)
        assert S(3).key in agent.provider.table
        m1.close_session()
        _wait(lambda: S(3).key not in agent.provider.table)  # its session ended: rolled back at once
        assert set(agent.provider.table) == {S(1).key}
        m2.commit()  # nothing pending any more


def test_an_agent_started_over_a_leftover_undo_record_rolls_it_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # What an agent killed with a confirmed commit pending leaves behind: it
    # had created S(7) and changed admission, which was False before.
    Journal(state).save(Record(Undo(created={S(7).key}, admission=False), "tok", time.time() + 600))
    a = RunningAgent(tmp_path, state_dir=str(state))
    try:
        assert not (state / Journal.NAME).exists() and a.agent.datastore.pending_commit() is None
        assert a.provider.admission() is False  # set back by the rollback at start
        with a.ncclient() as m:
            m.edit_config(target="candidate", config=_candidate_edit([S(1)]))
            m.commit(confirmed=True, persist="p")
            assert (state / Journal.NAME).exists()
    finally:
        a.stop()  # a stopping agent rolls its pending commit back
    assert a.provider.table == {} and not (state / Journal.NAME).exists()


def test_a_socket_closed_under_a_request_is_a_lost_session_not_a_traceback(agent: RunningAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session died between the connected check and the send (paramiko raises OSError): SessionLost, named."""
    with agent.client() as c:
        def closed(*_a: object, **_k: object) -> None:
            raise OSError("Socket is closed")
        monkeypatch.setattr(c._mgr, "execute", closed)
        with pytest.raises(SessionLost, match="get-config: the NETCONF session ended .Socket is closed"):
            c.get_sessions()
