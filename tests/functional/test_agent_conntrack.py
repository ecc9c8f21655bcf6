"""The agent on a real NAT node: conntrack in a namespace, SSH over the management network.

One agent (``natmig agent --provider conntrack --netns ...``) per module, in
a NAT namespace made by AgentLab; every test starts from an empty table and
checks the kernel's own view (``conntrack -L`` in the namespace), not only
what the agent says.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from natmig.agent.lab import AgentLab
from natmig.agent.natnode import HOLD_QUEUE
from natmig.controller.ncerrors import ConnectError, HostKeyError, NetconfError, SessionLost
from natmig.controller.netconf import NodeClient
from natmig.errors import ControllerError
from natmig.model import NatSession

pytestmark = pytest.mark.root


def S(port: int, pub: int | None = None, proto: str = "TCP") -> NatSession:
    return NatSession(proto, "10.0.0.2", port, "198.51.100.1", 80 if proto == "TCP" else 53, "203.0.113.1", pub or 20000 + port,
                      "ESTABLISHED" if proto == "TCP" else None, 300)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentLab]:
    with AgentLab(tmp_path_factory.mktemp("agent"), provider="conntrack", tag="fa") as lab:
        yield lab


@pytest.fixture
def node(lab: AgentLab) -> Iterator[NodeClient]:
    c = lab.client()
    try:
        c.delete_sessions(None, target="running")
        c.discard()
        c.set_admission(True)
        yield c
    finally:
        c.close()


def kernel(lab: AgentLab) -> set[str]:
    """The namespace's conntrack table without timeouts and without the management SSH connections."""
    out = set()
    for line in lab.conntrack("-L").stdout.splitlines():
        if "port=830 " in line or not line.strip():
            continue
        toks = line.split()
        out.add(" ".join(t for i, t in enumerate(toks) if i != 2 and not t.startswith("use=")))
    return out


def nat_lines(lab: AgentLab) -> list[str]:
    return sorted(line for line in kernel(lab) if "dst=203.0.113.1" in line)


def test_edit_config_writes_the_kernel_table(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1), S(2, proto="UDP")], target="running")
    lines = nat_lines(lab)
    assert len(lines) == 2
    assert any("sport=1 dport=80 src=198.51.100.1 dst=203.0.113.1 sport=80 dport=20001" in x for x in lines)
    assert {s.key for s in node.get_sessions()} == {S(1).key, S(2, proto="UDP").key}


def test_get_config_reads_what_the_kernel_has(lab: AgentLab, node: NodeClient) -> None:
    # A session the agent never saw: written straight into the kernel.
    lab.conntrack("-I", "-p", "tcp", "-s", "10.0.0.7", "-d", "198.51.100.1", "--sport", "4000", "--dport", "80",
                  "--state", "ESTABLISHED", "-t", "200", "-r", "198.51.100.1", "-q", "203.0.113.1", "--reply-port-src", "80", "--reply-port-dst", "20777")
    (s,) = node.get_sessions()
    assert (s.src_address, s.src_port, s.translated_port, s.tcp_state) == ("10.0.0.7", 4000, 20777, "ESTABLISHED")
    assert 190 <= (s.timeout or 0) <= 200
    assert node.get_statistics()["sessions"] == 1


def test_filtered_get_config_by_any_leaf(node: NodeClient) -> None:
    node.edit_sessions([S(1), S(2), S(3, proto="UDP")], target="running")
    assert [s.key for s in node.get_sessions(key=S(2).key)] == [S(2).key]
    assert node.get_sessions(key=S(9).key) == []


def test_operations_create_replace_delete_remove(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1), S(2)], target="running", operation="create")
    with pytest.raises(NetconfError) as e:
        node.edit_sessions([S(1)], target="running", operation="create")
    assert e.value.tag == "data-exists"
    node.edit_sessions([S(1, pub=20100)], target="running", operation="replace")
    assert any("dport=20100" in x for x in nat_lines(lab))
    node.edit_sessions([S(2)], target="running", operation="delete")
    with pytest.raises(NetconfError) as e:
        node.edit_sessions([S(2)], target="running", operation="delete")
    assert e.value.tag == "data-missing"
    node.edit_sessions([S(2)], target="running", operation="remove")
    assert [s.src_port for s in node.get_sessions()] == [1]


def test_failure_half_way_leaves_the_kernel_table_unchanged(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1), S(2)], target="running")
    before = kernel(lab)
    # The agent deletes S(1) first, then the node refuses the IPv6 session
    # (valid YANG, but this NAT translates IPv4 only): S(1) must come back
    # and S(3) must not stay.
    v6 = NatSession("TCP", "2001:db8::5", 5, "2001:db8::1", 80, "203.0.113.1", 20005, "ESTABLISHED", 300)
    with pytest.raises(NetconfError) as e:
        node.edit_mixed([("delete", S(1).key), ("create", S(3)), ("create", v6)], target="running")
    assert e.value.tag == "operation-failed"
    assert kernel(lab) == before
    assert sorted(s.src_port for s in node.get_sessions()) == [1, 2]


def test_edit_with_a_foreign_address_is_refused_whole(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1)], target="running")
    before = kernel(lab)
    bad = NatSession("TCP", "10.0.0.2", 9, "198.51.100.1", 80, "198.51.100.99", 20009, "ESTABLISHED", 300)
    with pytest.raises(NetconfError) as e:
        node.edit_sessions([S(2), bad], target="running")
    assert e.value.tag == "invalid-value" and "translated_address" in (e.value.path or "")
    assert kernel(lab) == before


def test_candidate_stages_a_table_and_commit_applies_it(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1)], target="running")
    node.replace_table([S(2), S(3)], target="candidate")
    assert [s.src_port for s in node.get_sessions()] == [1]
    node.commit()
    assert sorted(s.src_port for s in node.get_sessions()) == [2, 3]
    assert len(nat_lines(lab)) == 2


def test_admission_control_reaches_nftables(lab: AgentLab, node: NodeClient) -> None:
    admission = ["nft", "list", "chain", "ip", "natmig", "admission"]
    node.set_admission(False)
    assert node.get_admission() is False
    assert "meta mark set" in lab.node.run(admission, lab.nat_ns).stdout
    # The agent holds what the closed admission queues: it has bound the queue in its own process.
    queues = lab.node.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], lab.nat_ns).stdout.split("\n")
    assert any(line.split()[:1] == [str(HOLD_QUEUE)] for line in queues), queues
    node.set_admission(True)
    assert "meta mark set" not in lab.node.run(admission, lab.nat_ns).stdout


def test_notifications_follow_the_kernel(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1)], target="running")  # exists before the subscription
    listener = lab.client()
    try:
        sub = listener.subscribe()
        lab.conntrack("-I", "-p", "udp", "-s", "10.0.0.9", "-d", "198.51.100.1", "--sport", "5353", "--dport", "53", "-t", "60",
                      "-r", "198.51.100.1", "-q", "203.0.113.1", "--reply-port-src", "53", "--reply-port-dst", "21234")
        node.delete_sessions([S(1).key], target="running")
        got = [sub.get(timeout=5), sub.get(timeout=5)]
        assert ("destroyed", S(1).key) in [(e, s.key) for e, s in got if e]
        created = [s for e, s in got if e == "created"]
        assert created and created[0].translated_port == 21234
    finally:
        listener.close()


def test_two_sessions_lock_and_kill(lab: AgentLab, node: NodeClient) -> None:
    other = lab.client()
    try:
        other.lock("running")
        with pytest.raises(NetconfError) as e:
            node.edit_sessions([S(1)], target="running")
        assert e.value.tag == "in-use"
        assert nat_lines(lab) == []
        node.kill_session(other.session_id)
        deadline = time.monotonic() + 5
        while other.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not other.connected
        with pytest.raises(SessionLost):
            other.get_sessions()
        node.edit_sessions([S(1)], target="running")  # the lock died with the session
    finally:
        other.close()


def test_wrong_password_and_wrong_host_key_are_refused(lab: AgentLab, tmp_path: Path) -> None:
    with pytest.raises(ConnectError):
        lab.client(password="not-the-password")
    fake = tmp_path / "known_hosts"
    fake.write_text(f"[{lab.mgmt_address}]:{lab.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHWxMHnC6XkdVhQ4j0SBH7JbKXqkwUqNa4cVd4Yl4rNl\n")
    with pytest.raises(HostKeyError):
        lab.client(known_hosts=str(fake))


def test_log_says_who_did_what(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(4)], target="running")
    log = lab.log_tail(20000)
    assert re.search(r"session \d+ \(natmig@192\.0\.2\.1\) edit-config running \(merge\): 1 entries", log)


def test_default_operation_replace_and_continue_on_error(lab: AgentLab, node: NodeClient) -> None:
    node.edit_sessions([S(1), S(2), S(3)], target="running")
    node.edit_sessions([S(2), S(7)], target="running", operation=None, default_operation="replace")
    assert sorted(s.src_port for s in node.get_sessions()) == [2, 7]
    assert len(nat_lines(lab)) == 2
    # continue-on-error: the good entry is written, the refused one reported.
    bad = NatSession("TCP", "10.0.0.2", 8, "198.51.100.1", 80, "198.51.100.99", 20008, "ESTABLISHED", 300)
    with pytest.raises(NetconfError) as e:
        node.edit_sessions([S(9), bad], target="running", error_option="continue-on-error")
    assert e.value.tag == "invalid-value"
    assert sorted(s.src_port for s in node.get_sessions()) == [2, 7, 9]


def test_lock_unlock_and_candidate_lock(lab: AgentLab, node: NodeClient) -> None:
    with node.locked("running"), node.locked("candidate"):
        node.edit_sessions([S(1)], target="candidate")
        node.commit()
    other = lab.client()
    try:
        other.lock("running")  # released by the with-block above
        other.unlock("running")
    finally:
        other.close()
    assert [s.src_port for s in node.get_sessions()] == [1]


def test_a_whole_table_is_sent_in_chunks_while_the_kernel_table_is_read(lab: AgentLab, node: NodeClient) -> None:
    """3000 sessions (~0.7 MB of conntrack text): the reply leaves in several chunks, and they are exactly the reply."""
    node.edit_sessions([S(p) for p in range(1000, 4000)], target="running")
    chunks: list[bytes] = []
    reply = node.read_table("running", on_chunk=chunks.append)
    assert reply.tapped and len(chunks) >= 3, len(chunks)
    assert b"".join(chunks).decode() == reply.raw
    assert sorted(s.src_port for s in reply.sessions()) == list(range(1000, 4000))
    # The same session, untapped, reads the same table (the tap took only that one reply).
    again = node.read_table("running")
    assert not again.tapped and again.raw.count("</nat-session>") == 3000
    # Read by its tap alone (a migration's copy): the reply's body reaches the tap, and is not kept.
    chunks.clear()
    alone = node.read_table("running", on_chunk=chunks.append, keep=False)
    assert alone.tapped and alone.elided and alone.received == sum(map(len, chunks))
    assert b"".join(chunks).decode().count("</nat-session>") == 3000 and "<data>" not in alone.raw and 'message-id="' in alone.raw
    with pytest.raises(ControllerError, match="not kept"):
        alone.sessions()
    assert len(node.get_sessions()) == 3000  # the session goes on


def ssh_lines(lab: AgentLab) -> list[str]:
    """The management SSH connections in the node's table (the agent's own, port 830)."""
    return [line for line in lab.conntrack("-L").stdout.splitlines() if "port=830 " in line]


def test_on_20k_sessions_a_catch_up_writes_its_entries_refuses_a_clash_and_the_list_goes_without_the_management_connections(
        lab: AgentLab, node: NodeClient) -> None:
    table = [NatSession("TCP" if i % 2 else "UDP", f"10.0.0.{2 + i % 250}", 1024 + i // 250, f"198.51.100.{1 + i % 7}", 443 if i % 2 else 53,
                        "203.0.113.1", 1024 + i, "ESTABLISHED" if i % 2 else None, 600) for i in range(20_000)]
    node.edit_sessions(table, target="running", operation=None)
    # The catch-up: 100 sessions created and 50 closed on the source while it copied.
    new = [S(p) for p in range(30000, 30100)]
    gone = table[::400]
    node.edit_mixed([("create", s) for s in new] + [("delete", s.key) for s in gone], target="running")
    got = {s.key: s.public for s in node.get_sessions()}
    assert got == {s.key: s.public for s in [*table, *new] if s not in gone}
    # A session on the reply tuple of one the edit does not name: refused whole, the table unchanged.
    t = table[12_345]
    clash = NatSession(t.protocol, "10.0.0.253", 9, t.dst_address, t.dst_port, "203.0.113.1", t.translated_port, t.tcp_state, 600)
    before = kernel(lab)
    for extra in ([], [("delete", new[0].key)]):
        with pytest.raises(NetconfError) as e:
            node.edit_mixed([("create", S(40000)), ("create", clash), *extra], target="running")
        assert e.value.tag == "operation-failed" and e.value.__cause__.app_tag == "data-not-unique"  # type: ignore[union-attr]
        assert "[nats:src_address='10.0.0.253'][nats:src_port='9']" in (e.value.path or "") and (e.value.path or "").endswith("translated_port")
        assert "already used by" in (e.value.message or "")
        assert kernel(lab) == before
    # The whole list goes; the agent's own SSH connections (entries, not sessions) stay.
    # Only the live ones are compared: a closed connection's TIME_WAIT entry
    # expires by itself 120 s after the close, which a slow run reaches meanwhile.
    def live_ssh() -> list[str]:
        return [line for line in ssh_lines(lab) if "ESTABLISHED" in line]
    ssh = live_ssh()
    assert ssh
    node.delete_sessions(None, target="running")
    assert nat_lines(lab) == [] and len(live_ssh()) >= len(ssh)
    assert node.get_sessions() == [] and node.get_admission() is True  # the session still works


def netfilter_groups(pid: int) -> list[int]:
    """The multicast groups of each netfilter netlink socket process ``pid`` holds (/proc/PID/net/netlink: its namespace's)."""
    import os

    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    out = []
    with open(f"/proc/{pid}/net/netlink") as f:
        for line in f.readlines()[1:]:
            col = line.split()  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            if col[1] == "12" and col[9] in inodes:
                out.append(int(col[3], 16))
    return out


def test_from_its_start_the_agent_follows_its_table_and_its_statistics_are_what_a_full_read_says(lab: AgentLab, node: NodeClient) -> None:
    from natmig.agent import cttext
    from natmig.model import format_digest

    # Subscribed to NEW and DESTROY (groups 1 and 3) at start: a migration's first <get> reads no table.
    assert 0b101 in netfilter_groups(lab.pid)
    node.edit_sessions([S(1), S(2, proto="UDP"), S(3)], target="running")
    lab.conntrack("-I", "-p", "udp", "-s", "10.0.0.9", "-d", "198.51.100.1", "--sport", "7", "--dport", "53", "-t", "200")
    lab.conntrack("-D", "-p", "tcp", "--sport", "3", "--dport", "80")
    got = node.get_statistics()
    text = cttext.summarize_table(lab.conntrack("-L").stdout.encode())
    assert got == {"sessions": text.sessions, "untranslated": text.untranslated, "digest": format_digest(text.digest)}
    assert got["sessions"] == 2
