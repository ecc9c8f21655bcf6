"""Subscribed sessions over real SSH (MemoryProvider): a subscriber that stops reading, idle subscribers."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncssh
import pytest

from natmig.agent.outbox import Outbox
from natmig.framing import EOM
from natmig.model import NatSession

from .test_agent_ssh import CLIENT_HELLO_10, RunningAgent, rpc

SUBSCRIBE = rpc('<create-subscription xmlns="urn:ietf:params:xml:ns:netconf:notification:1.0"/>', 1) + EOM


def S(port: int) -> NatSession:
    return NatSession("TCP", "10.0.0.2", port, "198.51.100.1", 80, "203.0.113.1", 20000 + port % 40000, "ESTABLISHED", 300)


async def _subscriber(port: int, window: int = 1 << 16) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess]:  # type: ignore[type-arg]
    conn = await asyncssh.connect("127.0.0.1", port, username="natmig", password="secret", known_hosts=None)
    # A small receive window: once it is full, whatever the agent writes stays on the agent's side.
    proc = await conn.create_process(subsystem="netconf", encoding=None, window=window)
    proc.stdin.write(CLIENT_HELLO_10 + EOM + SUBSCRIBE)
    got = b""
    while got.count(EOM) < 2:
        got += await asyncio.wait_for(proc.stdout.read(1 << 16), 10)
    assert b"<ok/>" in got
    return conn, proc


def _wait(cond, within: float) -> bool:  # noqa: ANN001 - test helper
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_a_subscriber_that_stops_reading_is_dropped_past_its_backlog(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = RunningAgent(tmp_path, notify_backlog=256 << 10)
    try:
        fut = asyncio.run_coroutine_threadsafe(_subscriber(a.port), a.loop)
        conn, _ = fut.result(10)
        sid = max(a.agent.sessions)
        with a.client() as listener, caplog.at_level(logging.WARNING, logger="natmig.agent"):
            sub = listener.subscribe()
            # ~600 bytes an event: 8,000 events are ~4.8 MB: past the window, 1 MiB
            # unsent in the channel, and 8 x the backlog (its hard limit).
            for i in range(0, 8000, 500):
                a.provider.apply([S(1 + j) for j in range(i, i + 500)])
            assert _wait(lambda: sid not in a.agent.sessions, 10), "the subscriber that stopped reading is still served"
            assert any("does not read its notifications" in r.getMessage() for r in caplog.records)
            # The one that reads got every event.
            got = [sub.get(timeout=10) for _ in range(8000)]
            assert all(g is not None and g[0] == "created" for g in got)
        a.loop.call_soon_threadsafe(conn.close)
    finally:
        a.stop()


def test_an_idle_subscription_does_not_hold_its_session_for_ever(tmp_path: Path) -> None:
    a = RunningAgent(tmp_path, idle_timeout=1.0, max_sessions=2)
    try:
        conns = [asyncio.run_coroutine_threadsafe(_subscriber(a.port), a.loop).result(10)[0] for _ in range(2)]
        assert len(a.agent.sessions) == 2
        # Both slots are taken by subscribers that never ask for anything: they go.
        assert _wait(lambda: not a.agent.sessions, 4.0)
        with a.client() as c:  # a slot for the controller again
            assert c.get_sessions() == []
        for conn in conns:
            a.loop.call_soon_threadsafe(conn.close)
    finally:
        a.stop()


def test_a_subscriber_taking_its_notifications_is_not_idle(tmp_path: Path) -> None:
    a = RunningAgent(tmp_path, idle_timeout=1.0)
    try:
        with a.client() as listener:
            sub = listener.subscribe()
            for i in range(8):  # 2.4 s of events, each taken: longer than the idle timeout
                a.provider.apply([S(100 + i)])
                assert sub.get(timeout=5) == ("created", S(100 + i))
                time.sleep(0.3)
            assert listener.connected and len(a.agent.sessions) == 1
    finally:
        a.stop()


class _Channel:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.unsent = 0


def test_outbox_writes_while_the_client_keeps_up_and_gives_up_past_its_limit() -> None:
    loop = asyncio.new_event_loop()
    try:
        ch = _Channel()
        over: list[tuple[int, int]] = []
        box = Outbox(loop, ch.out.append, lambda: ch.unsent, 1000, lambda n, size: over.append((n, size)), stall=0.2)
        box.put(b"a" * 100)
        assert ch.out == [] and box.queued == 100  # held until the subscription's reply is out
        box.open()
        assert ch.out == [b"a" * 100]
        ch.unsent = 2 << 20  # the client stopped reading
        for _ in range(10):
            box.put(b"b" * 100)
        assert len(ch.out) == 1 and over == [] and box.queued == 1000
        box.put(b"c")  # past the limit, but it took something 0.2 s ago at most: not yet
        assert over == [] and box.queued == 1001
        time.sleep(0.25)
        box.put(b"d")
        assert over == [(12, 1002)] and box.closed and box.queued == 0
        box.put(b"e")
        assert len(ch.out) == 1
    finally:
        loop.close()


def test_outbox_gives_up_past_its_hard_limit_even_on_a_client_that_reads() -> None:
    loop = asyncio.new_event_loop()
    try:
        ch = _Channel()
        over: list[tuple[int, int]] = []
        box = Outbox(loop, ch.out.append, lambda: ch.unsent, 1000, lambda n, size: over.append((n, size)), stall=60.0)
        box.open()
        ch.unsent = 2 << 20
        for _ in range(80):
            box.put(b"b" * 100)
        assert over == [] and box.queued == 8000  # past the limit, but it took one just now
        box.put(b"c")
        assert over == [(81, 8001)]
    finally:
        loop.close()


def test_outbox_sends_what_waited_once_the_client_catches_up() -> None:
    async def go() -> list[bytes]:
        ch = _Channel()
        box = Outbox(asyncio.get_running_loop(), ch.out.append, lambda: ch.unsent, 1 << 20, lambda n, lim: None)
        box.open()
        ch.unsent = 2 << 20
        box.put(b"x")
        box.put(b"y")
        await asyncio.sleep(0.05)
        assert ch.out == []
        ch.unsent = 0
        await asyncio.sleep(0.1)
        return ch.out

    assert asyncio.run(go()) == [b"x", b"y"]


def test_a_filter_selects_the_events_form_state_change_or_nat_session_event(tmp_path: Path) -> None:
    """One event, two forms: the generic engine selects natmig-state's state-change, the NAT migration its own event."""
    from natmig.controller.statenode import StateNode

    def tags(c: object, n: int) -> list[str]:
        out = []
        while len(out) < n and (note := c.take_notification(2.0)) is not None:  # type: ignore[attr-defined]
            out += [e.tag.split("}")[1] for e in note if not e.tag.endswith("eventTime")]
        time.sleep(0.2)
        while (note := c.take_notification(0)) is not None:  # type: ignore[attr-defined]
            out += [e.tag.split("}")[1] for e in note if not e.tag.endswith("eventTime")]
        return out

    a = RunningAgent(tmp_path)
    try:
        with a.client() as generic_c, a.client() as nat_c, a.client() as both_c, a.client() as decoding_c:
            StateNode(generic_c).subscribe()
            nat_c.subscribe()
            both_c.create_subscription()
            decoding = StateNode(decoding_c)
            decoding.discover()
            decoding.subscribe()
            a.provider.apply([S(7)])
            assert tags(generic_c, 1) == ["state-change"]
            assert tags(nat_c, 1) == ["nat-session-event"]
            assert sorted(tags(both_c, 2)) == ["nat-session-event", "state-change"]
            # and the state-change is the entry as get-config gives it, in the list the agent's yang-library names
            [(lst, kind, entry)] = decoding.changes(timeout=5)
            assert (lst.qname, kind) == ("nat-session:nat-session", "created")
            assert dict(zip((s.name for s in lst.leaves), entry))["src_port"] == 7
    finally:
        a.stop()


def test_a_filter_that_selects_what_the_agent_does_not_send_is_refused_by_name(tmp_path: Path) -> None:
    from natmig.errors import ControllerError

    a = RunningAgent(tmp_path)
    try:
        with a.client() as c:
            with pytest.raises(ControllerError, match=r"the filter selects <agent-up> .*this agent sends <nat-session-event>"):
                c.create_subscription(("urn:natmig:yang:natmig-controller", "agent-up"))
    finally:
        a.stop()


def test_a_subscribed_session_gets_its_whole_table_streamed_with_the_notifications_after_it(tmp_path: Path) -> None:
    """The generic engine reads a source it follows: notifications wait while the reply streams, then come."""
    from natmig.agent.provider import MemoryProvider

    class Busy(MemoryProvider):
        """Sessions created while the table is read out, between two of its batches."""

        def batches(self):  # type: ignore[no-untyped-def]
            table = self.list().sessions
            for i in range(0, len(table), 100):
                yield table[i:i + 100]
                if i == 0:
                    for j in range(20):
                        self._emit("new", S(30000 + j))
                    time.sleep(0.3)  # the events reach the session while its reply is half sent

    p = Busy(owned={"203.0.113.1"})
    p.apply([S(1 + i) for i in range(500)])
    a = RunningAgent(tmp_path, provider=p)
    try:
        with a.client() as c:
            sub = c.subscribe()
            got = c.get_config_filtered("running", f'<nat-session xmlns="{c.codec.ns}"/>')
            assert len(got) == 500  # one well-formed reply, nothing inside it
            events = []
            while len(events) < 20 and (ev := sub.get(timeout=5)) is not None:
                events.append(ev)
            assert len(events) == 20 and {e[1].src_port for e in events} == {30000 + j for j in range(20)}
            assert c.get_sessions("running")  # the session goes on
            sid = max(a.agent.sessions)
            assert a.agent.sessions[sid].state.record.out_notifications >= 20
    finally:
        a.stop()
