"""The conntrack session provider against the real kernel: real flows through real NAT nodes.

Every test builds its own namespaces (run-prefixed) and removes them in a
``finally``, whatever happened.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from natmig import netns
from natmig.agent import ctbulk
from natmig.agent import cttext
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.provider import ApplyError
from natmig.model import NatSession
from natmig.errors import ProviderError

from .helpers_natnode import CLIENT_IP, PUBLIC_IP, SERVER_IP, TwoNatNet, built, finish, replies_after, wait_replies

pytestmark = pytest.mark.root

TCP_PORT, UDP_PORT = 5001, 5002
TCP_SPORT, UDP_SPORT = 40001, 40002  # outside the NAT's port range, so translation must change them


@pytest.fixture
def net():
    """Client, server, switch and NAT nodes a and b, always torn down."""
    with built("nmct") as n:
        yield n


def providers(net: TwoNatNet) -> tuple[ConntrackProvider, ConntrackProvider]:
    """The providers of NAT nodes a and b."""
    a, b = net.nats["a"], net.nats["b"]
    return ConntrackProvider(a.name, node=a), ConntrackProvider(b.name, node=b)


def start_flows(net: TwoNatNet, duration: float, interval: float = 0.02):
    """Echo servers, then one TCP and one UDP client flow; returns the two clients."""
    net.start_servers(TCP_PORT, UDP_PORT)
    tcp = net.start("tcp-client", net.client, SERVER_IP, TCP_PORT, TCP_SPORT, duration, interval)
    udp = net.start("udp-client", net.client, SERVER_IP, UDP_PORT, UDP_SPORT, duration, interval)
    return tcp, udp


def flow_sessions(sessions: list[NatSession]) -> dict[str, NatSession]:
    """The test flows' sessions by protocol."""
    want = {("TCP", CLIENT_IP, TCP_SPORT, SERVER_IP, TCP_PORT), ("UDP", CLIENT_IP, UDP_SPORT, SERVER_IP, UDP_PORT)}
    return {s.protocol: s for s in sessions if s.key in want}


def comparable(sessions: list[NatSession]) -> dict:
    """A table without what changes by itself (timeouts), for equality checks."""
    return {s.key: dataclasses.replace(s, timeout=None) for s in sessions}


def synthetic(n: int, start_port: int = 20000, net: int = 0) -> list[NatSession]:
    """n varied sessions (all protocols, states, marks) on the public address; ``net`` varies the keys."""
    states = ["ESTABLISHED", "SYN_RECV", "FIN_WAIT", "CLOSE_WAIT", "TIME_WAIT", "LAST_ACK"]
    out = []
    for i in range(n):
        proto = ("TCP", "UDP", "ICMP")[i % 3]
        out.append(NatSession(
            proto, f"10.0.{net}.{10 + i % 200}", (1000 + i) if proto != "ICMP" else i, f"198.51.100.{1 + i % 50}",
            (80 + i % 7) if proto != "ICMP" else 0, PUBLIC_IP, start_port + i,
            states[(i // 3) % len(states)] if proto == "TCP" else None, 300 + i, bool(i % 2), i % 5,
        ))
    return out


def test_list_shows_real_tcp_and_udp_with_the_port_the_server_saw(net: TwoNatNet) -> None:
    a, _ = providers(net)
    tcp, udp = start_flows(net, duration=1.2)
    wait_replies(tcp, 0.6)
    # Not translated: the client pings the NAT's own inside address.
    netns.run(["ping", "-c", "1", "-W", "1", "10.0.0.1"], net.client)
    snap = a.list()
    t, u = finish(tcp), finish(udp)
    got = flow_sessions(snap.sessions)
    assert set(got) == {"TCP", "UDP"}, snap.sessions
    assert t["error"] is None and u["replies"], (t, u)
    assert t["ports"] == [got["TCP"].translated_port]
    assert u["ports"] == [got["UDP"].translated_port]
    for s in got.values():
        assert s.translated_address == PUBLIC_IP
        assert 20000 <= s.translated_port <= 29999 and s.translated_port != s.src_port
        assert s.timeout is not None and s.timeout > 0
    assert got["TCP"].tcp_state == "ESTABLISHED" and got["UDP"].tcp_state is None
    assert snap.untranslated >= 1
    assert all(s.src_address != CLIENT_IP or s.dst_address != "10.0.0.1" for s in snap.sessions)


def test_export_from_a_apply_to_idle_b_gives_the_same_table(net: TwoNatNet) -> None:
    a, b = providers(net)
    tcp, udp = start_flows(net, duration=1.0)
    wait_replies(tcp, 0.5)
    a.apply(synthetic(300))  # a richer table than two flows: ICMP, states, marks, assured
    exported = a.list().sessions
    assert len(exported) >= 302
    assert b.list().sessions == []
    b.apply(exported)
    mine = b.list().sessions
    assert comparable(mine) == comparable(exported)
    by_key = {s.key: s for s in exported}
    for s in mine:  # remaining lifetimes carried over (minus the seconds that passed)
        assert by_key[s.key].timeout - 3 <= s.timeout <= by_key[s.key].timeout
    finish(tcp), finish(udp)


def move(net: TwoNatNet, with_state: bool) -> tuple[dict, dict, float, dict[str, NatSession]]:
    """Run TCP, UDP and ping through a, (copy a's table to b,) steer to b; the flows' summaries."""
    a, b = providers(net)
    tcp, udp = start_flows(net, duration=3.0)
    ping = net.popen(["ping", "-n", "-q", "-i", "0.05", "-c", "50", "-W", "1", SERVER_IP], net.client)
    wait_replies(tcp, 1.0)
    before = flow_sessions(a.list().sessions)
    icmp = [s for s in a.list().sessions if s.protocol == "ICMP" and s.src_address == CLIENT_IP]
    assert len(icmp) == 1, icmp
    before["ICMP"] = icmp[0]
    if with_state:
        b.apply(a.list().sessions)
    net.attach("b")
    t_move = time.time()
    out, _ = ping.communicate(timeout=30)
    before["ping"] = out  # type: ignore[assignment]
    return finish(tcp), finish(udp), t_move, before


def test_live_tcp_and_udp_keep_flowing_with_the_same_public_port_after_the_move(net: TwoNatNet) -> None:
    t, u, t_move, before = move(net, with_state=True)
    assert t["error"] is None, t["error"]
    assert replies_after(t, t_move + 0.5) >= 20 and replies_after(u, t_move + 0.5) >= 20, (t["sent"], u["sent"])
    assert t["ports"] == [before["TCP"].translated_port]
    assert u["ports"] == [before["UDP"].translated_port]
    # And node b is the one translating them now.
    _, b = providers(net)
    table = b.list().sessions
    now = flow_sessions(table)
    assert {p: s.translated_port for p, s in now.items()} == {p: before[p].translated_port for p in ("TCP", "UDP")}
    # ICMP echo: the injected session (created over netlink) translates; the
    # pings kept being answered through b with a's echo identifier.
    icmp = [s for s in table if s.protocol == "ICMP" and s.key == before["ICMP"].key]
    assert len(icmp) == 1 and icmp[0].translated_port == before["ICMP"].translated_port
    received = int(before["ping"].split(" received")[0].split()[-1])
    assert received >= 40, before["ping"]


def test_negative_control_the_same_move_without_state_breaks_both(net: TwoNatNet) -> None:
    t, u, t_move, before = move(net, with_state=False)
    # TCP: node b picks the connection up mid-stream with a new port and the
    # server resets it (or b drops it): either way it does not survive.
    assert t["error"] is not None or t["ports"] != [before["TCP"].translated_port], t
    # UDP: node b gives the flow a new public port.
    assert u["ports"] != [before["UDP"].translated_port], u


def test_busy_tcp_with_data_in_flight_survives_the_move(net: TwoNatNet) -> None:
    # 64 requests of 1400 bytes in flight, answered as fast as they come: the
    # connection's windows move on while node b holds a session it never saw
    # a packet of (no window-tracking data: the BE_LIBERAL trap).
    a, b = providers(net)
    # Without the node's safety net, so that the sessions themselves must carry BE_LIBERAL
    # (with neither, this connection is reset right after the move).
    netns.sysctl(b.netns, "net.netfilter.nf_conntrack_tcp_be_liberal", 0)
    net.start_servers(TCP_PORT, UDP_PORT)
    bulk = net.start("tcp-client", net.client, SERVER_IP, TCP_PORT, TCP_SPORT, 2.5, 0, 1400, 64)
    wait_replies(bulk, 0.8)
    before = flow_sessions(a.list().sessions)["TCP"]
    b.apply(a.list().sessions)
    net.attach("b")
    t_move = time.time()
    t = finish(bulk)
    assert t["error"] is None, t["error"]
    assert t["ports"] == [before.translated_port]
    assert t["replies_total"] > 1000 and replies_after(t, t_move + 0.5) > 0, t["replies_total"]


def test_refused_batches_name_the_offenders_and_leave_the_table_unchanged(net: TwoNatNet) -> None:
    a, _ = providers(net)
    a.apply(synthetic(30))
    before = comparable(a.list().sessions)
    taken = synthetic(1)[0]
    fresh = synthetic(3, start_port=21000, net=1)
    cases = {
        # Same public endpoint towards the same remote: the kernel's reply tuple clashes.
        "port already used": NatSession(taken.protocol, "10.0.0.250", 999, taken.dst_address, taken.dst_port, PUBLIC_IP, taken.translated_port),
        "foreign address": NatSession("UDP", "10.0.0.250", 998, SERVER_IP, 53, "203.0.113.77", 22000),
        "invalid entry": NatSession("UDP", "10.0.0.250", 997, SERVER_IP, 53, PUBLIC_IP, 22001, tcp_state="ESTABLISHED"),
        "invalid address": NatSession("TCP", "fe80::1", 996, SERVER_IP, 53, PUBLIC_IP, 22002),
    }
    for why, bad in cases.items():
        with pytest.raises(ApplyError) as ei:
            a.apply([*fresh, bad])
            pytest.fail(f"{why}: not refused")
        assert set(ei.value.problems) == {bad.key}, (why, ei.value.problems)
        assert comparable(a.list().sessions) == before, why
    # The same public port towards another remote is what Linux itself does
    # when the range is busy: accepted, and the kernel keeps both.
    shared = NatSession(taken.protocol, "10.0.0.250", 995, taken.dst_address, taken.dst_port + 1, PUBLIC_IP, taken.translated_port)
    a.apply([shared])
    got = {x.key: x for x in a.list().sessions}
    assert got[shared.key].translated_port == taken.translated_port and taken.key in got
    a.delete([shared.key])
    assert comparable(a.list().sessions) == before
    # Two entries of one batch wanting the same reply tuple: named.
    x = NatSession("UDP", "10.0.0.251", 1, SERVER_IP, 53, PUBLIC_IP, 23000)
    y = dataclasses.replace(x, src_port=2)
    with pytest.raises(ApplyError) as ei:
        a.apply([x, y])
    assert y.key in ei.value.problems
    assert comparable(a.list().sessions) == before


def hidden_clash(a: ConntrackProvider) -> tuple[dict, NatSession]:
    """Ten sessions in ``a``, and a session the kernel will refuse though no check sees why.

    An untranslated entry is not a nat-session, so check_batch cannot see
    it; the kernel refuses to create a session with the same key.  Returns
    the table before (comparable) and that session.
    """
    netns.run(["conntrack", "-I", "-p", "udp", "-s", CLIENT_IP, "-d", SERVER_IP, "--sport", "7000", "--dport", "53",
               "-t", "100", "-u", "SEEN_REPLY"], a.netns)
    a.apply(synthetic(10))
    return comparable(a.list().sessions), NatSession("UDP", CLIENT_IP, 7000, SERVER_IP, 53, PUBLIC_IP, 24000)


def test_kernel_refusal_part_way_is_rolled_back(net: TwoNatNet) -> None:
    a, _ = providers(net)
    before, hidden = hidden_clash(a)
    batch = [*synthetic(5, start_port=25000, net=1), hidden, *synthetic(5, start_port=25100, net=2)]
    with pytest.raises(ApplyError) as ei:
        a.apply(batch)
    assert list(ei.value.problems) == [hidden.key]
    assert comparable(a.list().sessions) == before


def test_kernel_refusal_in_a_later_netlink_batch_is_named_and_rolled_back(net: TwoNatNet, monkeypatch: pytest.MonkeyPatch) -> None:
    # Creates reach the kernel in batches of CREATE_BATCH messages: the
    # refused one sits in the third, after two full batches were created.
    # All TCP, the largest message: a batch is larger than a netlink socket's
    # default send buffer.  The batch is read against a dump of the table
    # (the path of a batch larger than the table; by key: test_conntrack_keyed).
    monkeypatch.setattr(ConntrackProvider, "_reads_by_key", lambda self, k: False)
    a, _ = providers(net)
    a.apply(synthetic(30))
    before = comparable(a.list().sessions)
    taken = next(s for s in a.list().sessions if s.protocol == "TCP")
    fresh = [
        NatSession("TCP", f"10.1.{i // 250}.{i % 250}", 1000 + i, "198.51.100.9", 443, PUBLIC_IP, 30000 + i, "ESTABLISHED", 300, True, i % 3)
        for i in range(ctbulk.CREATE_BATCH * 3)
    ]
    # The same public port towards the same remote as a session of the
    # table: check_batch names it; with the check off, the kernel must refuse
    # it (the port is pinned) rather than pick another port.
    clash = NatSession("TCP", "10.0.9.9", 999, taken.dst_address, taken.dst_port, PUBLIC_IP, taken.translated_port, "ESTABLISHED", 300)
    at = ctbulk.CREATE_BATCH * 2 + 5
    batch = [*fresh[:at], clash, *fresh[at:]]
    with pytest.raises(ApplyError) as ei:
        a.apply(batch)
    assert list(ei.value.problems) == [clash.key] and "already used by" in ei.value.problems[clash.key]
    monkeypatch.setattr("natmig.agent.conntrack.check_batch", lambda batch, existing, owned: {})
    with pytest.raises(ApplyError) as ei:
        a.apply(batch)
    assert list(ei.value.problems) == [clash.key]
    assert ei.value.problems[clash.key].startswith("kernel refused to create it: EEXIST"), ei.value.problems
    assert comparable(a.list().sessions) == before
    # Refused by a check instead (a foreign address at the end): nothing was sent at all.
    monkeypatch.undo()
    monkeypatch.setattr(ConntrackProvider, "_reads_by_key", lambda self, k: False)
    with pytest.raises(ApplyError) as ei:
        a.apply([*fresh, dataclasses.replace(fresh[0], src_port=9, translated_address="203.0.113.77")])
    assert len(ei.value.problems) == 1
    assert comparable(a.list().sessions) == before
    # And the same batch without the clash goes in whole.
    a.apply(fresh)
    assert len(a.list().sessions) == len(before) + len(fresh)


@pytest.mark.parametrize("by_key", [False, True], ids=["by-dump", "by-key"])
def test_reply_tuple_held_by_an_untranslated_connection_is_refused_not_remapped(net: TwoNatNet, monkeypatch: pytest.MonkeyPatch, by_key: bool) -> None:
    # Entries that are not sessions but hold what a session's reply tuple needs.
    # Without the check the kernel silently gave the TCP session another
    # public port (asked 20005, got 23090): not "exactly as given".  By dump
    # the check refuses before writing; by key the kernel refuses (the port
    # is pinned), the batch is undone and a GET of the reply tuple names the holder.
    monkeypatch.setattr(ConntrackProvider, "_reads_by_key", lambda self, k: by_key)
    a, _ = providers(net)
    holders = {
        # inbound, untranslated: its original tuple is the reply tuple of 203.0.113.1:20005 <-> 198.51.100.1:80
        "TCP": (["-p", "tcp", "-s", "198.51.100.1", "-d", PUBLIC_IP, "--sport", "80", "--dport", "20005", "--state", "ESTABLISHED"],
                NatSession("TCP", "10.0.0.9", 1234, "198.51.100.1", 80, PUBLIC_IP, 20005, "ESTABLISHED", 100)),
        # the node's own outbound UDP from its public address: its reply tuple
        "UDP": (["-p", "udp", "-s", PUBLIC_IP, "-d", "198.51.100.2", "--sport", "20006", "--dport", "53", "-u", "SEEN_REPLY"],
                NatSession("UDP", "10.0.0.9", 1235, "198.51.100.2", 53, PUBLIC_IP, 20006, None, 100)),
        # the node's own ping from its public address: the echo reply tuple
        "ICMP": (["-p", "icmp", "-s", PUBLIC_IP, "-d", "198.51.100.4", "--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "20008"],
                 NatSession("ICMP", "10.0.0.9", 7, "198.51.100.4", 0, PUBLIC_IP, 20008, None, 100)),
    }
    for args, _ in holders.values():
        netns.run(["conntrack", "-I", *args, "-t", "200"], a.netns)
    a.apply(synthetic(9))
    before = comparable(a.list().sessions)
    untranslated = a.list().untranslated
    fresh = synthetic(6, start_port=21000, net=1)

    def refused(bad: NatSession) -> dict:
        with pytest.raises(ApplyError) as ei:
            a.apply([*fresh[:3], bad, *fresh[3:]])
            pytest.fail(f"{bad} was not refused")
        assert comparable(a.list().sessions) == before, bad.protocol
        assert a.list().untranslated == untranslated
        return ei.value.problems

    for proto, (_, bad) in holders.items():
        problems = refused(bad)
        assert list(problems) == [bad.key], (proto, problems)
        assert "does not translate" in problems[bad.key] and str(bad.translated_port) in problems[bad.key]
    # Had such a connection appeared after the check (traffic racing the
    # batch), the kernel refuses too -- the public port is pinned -- and what
    # was written is rolled back.
    monkeypatch.setattr("natmig.agent.conntrack.held_elsewhere", lambda batch, taken: {})
    for proto, (_, bad) in holders.items():
        problems = refused(bad)
        assert list(problems) == [bad.key], (proto, problems)
        assert "kernel refused" in problems[bad.key], problems
    # The same public port towards another remote is free, and given exactly.
    ok = [dataclasses.replace(bad, dst_address="198.51.100.60") for _, bad in holders.values()]
    a.apply(ok)
    got = {s.key: s for s in a.list().sessions}
    assert {s.key: got[s.key].public for s in ok} == {s.key: s.public for s in ok}


def test_a_small_table_read_by_key_is_the_dump_read(net: TwoNatNet, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sessions of every protocol and state, and entries that are not sessions (inbound,
    # the node's own UDP and ping, a destination-NATed one): what the dump's parse makes
    # of them, the reads by key must make too, the holds included.
    a, _ = providers(net)
    for args in (["-p", "tcp", "-s", "198.51.100.1", "-d", PUBLIC_IP, "--sport", "80", "--dport", "20005", "--state", "ESTABLISHED"],
                 ["-p", "udp", "-s", PUBLIC_IP, "-d", "198.51.100.2", "--sport", "20006", "--dport", "53", "-u", "SEEN_REPLY"],
                 ["-p", "icmp", "-s", PUBLIC_IP, "-d", "198.51.100.4", "--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "20008"],
                 ["-p", "tcp", "-s", CLIENT_IP, "-d", "198.51.100.9", "--sport", "4000", "--dport", "80", "--state", "ESTABLISHED",
                  "--reply-src", "10.0.0.77", "--reply-dst", CLIENT_IP, "--reply-port-src", "8080", "--reply-port-dst", "4000"]):
        netns.run(["conntrack", "-I", *args, "-t", "200"], a.netns)
    a.apply(synthetic(30))
    a.statistics()  # the live digest now follows the table
    taken_by_key: dict = {}
    taken_by_dump: dict = {}
    by_key = a._read_few(taken_by_key)
    by_dump = a._finish_read(a._start_read(), taken_by_dump)
    assert by_key is not None, "the live digest did not name the entries"
    assert comparable(by_key.sessions) == comparable(by_dump.sessions) and len(by_dump.sessions) == 30
    assert by_key.untranslated == by_dump.untranslated >= 4
    assert taken_by_key == taken_by_dump and len(taken_by_dump) >= 5
    # Beyond the bound the table is dumped as before.
    monkeypatch.setattr("natmig.agent.conntrackbase.FEW_ENTRIES", 10)
    assert a._read_few({}) is None
    assert comparable(a.list().sessions) == comparable(by_dump.sessions)


def test_apply_replaces_existing_keys_and_fills_default_timeouts(net: TwoNatNet) -> None:
    a, _ = providers(net)
    s = NatSession("TCP", "10.0.0.9", 1234, SERVER_IP, 80, PUBLIC_IP, 26000, "ESTABLISHED", 500, False, 1)
    a.apply([s])
    same_port = dataclasses.replace(s, tcp_state="FIN_WAIT", timeout=60, assured=True, mark=7)
    a.apply([same_port])
    assert comparable(a.list().sessions) == comparable([same_port])
    new_port = dataclasses.replace(same_port, translated_port=26001, timeout=None)
    a.apply([new_port])
    (got,) = a.list().sessions
    assert got.translated_port == 26001 and got.mark == 7
    fin_wait = int(netns.run(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_timeout_fin_wait"], a.netns).stdout)
    assert fin_wait - 3 <= got.timeout <= fin_wait


def test_delete_by_key_and_all(net: TwoNatNet) -> None:
    a, _ = providers(net)
    ss = synthetic(12)
    a.apply(ss)
    missing = ("UDP", "10.0.0.99", 1, SERVER_IP, 1)
    assert a.delete([ss[0].key, ss[1].key, ss[2].key, missing]) == 3
    assert {s.key for s in a.list().sessions} == {s.key for s in ss[3:]}
    with pytest.raises(ProviderError, match="src_address"):
        a.delete([("UDP", "not-an-ip", 1, SERVER_IP, 1)])
    assert a.delete() == 9
    assert a.list().sessions == []


def test_watch_reports_new_and_destroyed_translated_sessions_only(net: TwoNatNet) -> None:
    a, _ = providers(net)
    # Created while nobody listened: its end must still be reported (nf_conntrack_events=1).
    before = synthetic(1, start_port=27100, net=3)[0]
    a.apply([before])
    with a.watch() as w:
        a.delete([before.key])
        net.start_servers(TCP_PORT, UDP_PORT)
        udp = net.start("udp-client", net.client, SERVER_IP, UDP_PORT, UDP_SPORT, 0.3, 0.05)
        finish(udp)
        netns.run(["ping", "-c", "1", "-W", "1", "10.0.0.1"], net.client)  # untranslated: no event
        s = synthetic(1, start_port=27000)[0]
        a.apply([s])
        a.delete([s.key])
        deadline = time.time() + 3
        events = []
        while time.time() < deadline and len(events) < 4:
            ev = w.get(timeout=0.2)
            if ev is not None:
                events.append(ev)
    events += w.drain()  # anything that came after the fourth
    assert w.get() is None and list(w) == []  # closed: the stream has ended, nothing blocks
    kinds = [(e.kind, e.session.key) for e in events]
    flow = ("UDP", CLIENT_IP, UDP_SPORT, SERVER_IP, UDP_PORT)
    assert ("new", flow) in kinds
    assert ("new", s.key) in kinds and ("destroy", s.key) in kinds
    assert ("destroy", before.key) in kinds
    assert all(e.session.dst_address != "10.0.0.1" for e in events)
    created = next(e.session for e in events if e.session.key == flow)
    assert created.translated_address == PUBLIC_IP and created.translated_port != UDP_SPORT


def test_admission_through_the_provider(net: TwoNatNet) -> None:
    a, _ = providers(net)
    assert a.admission() is True
    a.set_admission(False)
    assert a.admission() is False
    a.set_admission(True)
    assert a.admission() is True
    with pytest.raises(ProviderError, match="NatNode"):
        ConntrackProvider(a.netns, {PUBLIC_IP}).set_admission(False)


def test_teardown_leaves_no_namespace_behind_even_on_failure() -> None:
    n = TwoNatNet(netns.run_prefix("nmcf"))
    with pytest.raises(RuntimeError):
        try:
            n.build()
            n.start_servers(TCP_PORT, UDP_PORT)
            raise RuntimeError("a test failing half-way")
        finally:
            n.destroy()
    assert [ns for ns in n.namespaces() if netns.exists(ns)] == []
    assert netns.list_netns(n.prefix) == []


def test_statistics_count_and_digest_exactly_what_list_returns(net: TwoNatNet) -> None:
    from natmig.agent.provider import SessionProvider
    from natmig.model import table_digest

    a, _ = providers(net)
    tcp, udp = start_flows(net, duration=1.0)
    ping = net.popen(["ping", "-n", "-q", "-i", "0.05", "-c", "10", "-W", "1", SERVER_IP], net.client)
    wait_replies(tcp, 0.5)
    # Untranslated: the client pings the NAT's own inside address.
    netns.run(["ping", "-c", "1", "-W", "1", "10.0.0.1"], net.client)
    a.apply(synthetic(300))  # injected TCP (every state), UDP and ICMP, marks, assured
    # The flows end first, so that the reads below see one table (only timeouts tick).
    ping.communicate(timeout=30)
    finish(tcp), finish(udp)
    snap = a.list()
    stats = a.statistics()
    protocols = {s.protocol for s in snap.sessions}
    assert protocols == {"TCP", "UDP", "ICMP"} and snap.untranslated >= 1
    assert any(s.protocol == "ICMP" and s.src_address == CLIENT_IP for s in snap.sessions)  # the live ping's session
    assert stats == {"sessions": len(snap.sessions), "untranslated": snap.untranslated, "digest": table_digest(snap.sessions)}
    # The ABC's default (list + table_digest) gives the same, and so does the
    # line-by-line parse of the same text the tool prints.
    assert SessionProvider.statistics(a) == stats
    text = netns.run(["conntrack", "-L"], a.netns).stdout
    assert cttext.parse_table(text.encode()) == cttext._parse_lines(text)
    assert comparable(cttext._parse_lines(text).sessions) == comparable(snap.sessions)


INSIDE_SCRIPT = """
import json, sys
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.natnode import NatNode, NatNodeConfig
from natmig.controller.demosessions import synthetic_sessions
ns = sys.argv[1]
p = ConntrackProvider(ns, public_addresses={"%s"})
out = {"empty_known": p._known_empty(), "list": len(p.list().sessions), "stats": p.statistics()}
p.apply(synthetic_sessions(3, "%s", (20000, 29999)))
out.update(after_known=p._known_empty(), after_list=len(p.list().sessions), after_stats=p.statistics())
print(json.dumps(out))
"""


def test_from_inside_the_namespace_an_empty_table_is_read_without_a_process_and_a_full_one_as_before(net: TwoNatNet) -> None:
    """The agent's case: living in the node's namespace, it knows an empty table from the kernel's count."""
    import json
    import subprocess
    import sys

    b = net.nats["b"].name
    cp = subprocess.run(["ip", "netns", "exec", b, sys.executable, "-c", INSIDE_SCRIPT % (PUBLIC_IP, PUBLIC_IP), b],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert got["empty_known"] is True and got["list"] == 0 and got["stats"]["sessions"] == 0
    assert got["after_known"] is False and got["after_list"] == 3 and got["after_stats"]["sessions"] == 3
    # From outside (this test process) the count is not ours to read: the process path is taken.
    assert ConntrackProvider(b, node=net.nats["b"])._known_empty() is False
    assert len(ConntrackProvider(b, node=net.nats["b"]).list().sessions) == 3


def test_handshake_states_are_written_as_established(net: TwoNatNet) -> None:
    """A migrated SYN_SENT entry would make the connection's next packets invalid: the node writes it ESTABLISHED."""
    a, _ = providers(net)
    syn = NatSession("TCP", "10.0.0.9", 1234, SERVER_IP, 80, PUBLIC_IP, 26000, "SYN_SENT", 100, False, 0)
    fin = dataclasses.replace(syn, src_port=1235, translated_port=26001, tcp_state="FIN_WAIT")
    a.apply([syn, fin])
    got = {s.src_port: s for s in a.list().sessions}
    assert got[1234].tcp_state == "ESTABLISHED" and got[1234].translated_port == 26000 and got[1234].timeout <= 100
    assert got[1235].tcp_state == "FIN_WAIT"
