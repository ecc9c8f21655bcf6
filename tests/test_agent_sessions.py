"""Session edges over real SSH on loopback (MemoryProvider): hello, deadlines, kill-session, broken credential files."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from natmig.controller.ncerrors import ConnectError
from natmig.framing import EOM

from .test_agent_ssh import CLIENT_HELLO_10, RunningAgent, agent, raw, rpc  # noqa: F401 - agent is a fixture


def test_white_space_before_the_hello_xml_declaration_is_accepted(agent: RunningAgent) -> None:
    # What scrapli-netconf sends: the session used to end without a word.
    hello = b'\n<?xml version="1.0" encoding="UTF-8"?>' + CLIENT_HELLO_10
    out = raw(agent.port, [b'\n<?xml version="1.0" encoding="UTF-8"?>' + rpc("<get/>", 9) + EOM], hello=hello)
    assert b'message-id="9"' in out and b"<data>" in out


async def _trickle(port: int, every: float, for_s: float) -> float:
    """Send a hello one byte every ``every`` s; how long until the agent closes the channel."""
    async with asyncssh.connect("127.0.0.1", port, username="natmig", password="secret", known_hosts=None) as conn:
        proc = await conn.create_process(subsystem="netconf", encoding=None)
        t0 = time.monotonic()
        closed = asyncio.get_running_loop().create_future()

        async def drain() -> None:
            while await proc.stdout.read(1 << 16):
                pass
            closed.set_result(time.monotonic() - t0)

        task = asyncio.create_task(drain())
        for b in CLIENT_HELLO_10:
            if closed.done() or time.monotonic() - t0 > for_s:
                break
            try:
                proc.stdin.write(bytes([b]))
            except (BrokenPipeError, asyncssh.Error):
                break
            await asyncio.sleep(every)
        try:
            return await asyncio.wait_for(closed, 1.0)
        except asyncio.TimeoutError:
            return float("inf")
        finally:
            task.cancel()


def test_the_hello_timeout_is_one_deadline_not_per_read(tmp_path: Path) -> None:
    a = RunningAgent(tmp_path, hello_timeout=1.0)
    try:
        took = asyncio.run(_trickle(a.port, 0.2, 4.0))
        assert took < 2.0, f"a hello trickling a byte every 0.2 s kept the session {took:.1f} s"
    finally:
        a.stop()


def test_kill_session_releases_the_locks_before_it_replies(agent: RunningAgent) -> None:
    victim = agent.client()
    victim.lock("running")
    # Hold the event loop, so that only what kill-session does before its
    # reply can release the lock.
    busy = threading.Event()
    agent.loop.call_soon_threadsafe(lambda: (busy.set(), time.sleep(0.5)))
    busy.wait(5)
    assert agent.agent.kill(victim.session_id)
    assert agent.agent.datastore.lock_holder("running") is None
    with agent.client() as a:
        for _ in range(10):
            with agent.client() as b:
                b.lock("running")
                a.kill_session(b.session_id)
                a.lock("running")  # at once: no lock-denied
                a.unlock("running")


def test_a_broken_password_file_is_named_in_the_log(agent: RunningAgent, caplog: pytest.LogCaptureFixture) -> None:
    (agent.tmp / "passwords").write_text("natmig:not-a-hash\n")
    with caplog.at_level(logging.ERROR, logger="natmig.agent"):
        with pytest.raises(ConnectError):
            agent.client()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(agent.tmp / "passwords") in m and "line 1" in m for m in lines), lines
    (agent.tmp / "passwords").chmod(0)
    (agent.tmp / "authorized_keys.natmig").write_text("ssh-ed25519 garbage\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="natmig.agent"):
        with pytest.raises(ConnectError):
            agent.client(password=None, key_filename=str(agent.tmp / "id_ed25519"))
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(agent.tmp / "authorized_keys.natmig") in m for m in lines), lines


def test_a_hello_of_too_many_elements_is_refused_before_it_is_parsed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = RunningAgent(tmp_path, max_elements=1000)
    try:
        hello = CLIENT_HELLO_10.replace(b"</capabilities>", b"<x/>" * 2000 + b"</capabilities>")
        with caplog.at_level(logging.INFO, logger="natmig.agent"):
            out = raw(a.port, [rpc("<get/>") + EOM], hello=hello, read_for=2.0)
        assert b"<rpc-reply" not in out
        assert any("hello refused" in r.getMessage() and "1000 XML nodes" in r.getMessage() for r in caplog.records)
    finally:
        a.stop()


async def _trickle_request(port: int, every: float, for_s: float) -> float:
    """After the hello, send a request one byte every ``every`` s; how long until the agent closes the channel."""
    async with asyncssh.connect("127.0.0.1", port, username="natmig", password="secret", known_hosts=None) as conn:
        proc = await conn.create_process(subsystem="netconf", encoding=None)
        proc.stdin.write(CLIENT_HELLO_10 + EOM)
        t0 = time.monotonic()
        closed = asyncio.get_running_loop().create_future()

        async def drain() -> None:
            while await proc.stdout.read(1 << 16):
                pass
            closed.set_result(time.monotonic() - t0)

        task = asyncio.create_task(drain())
        for b in rpc("<get/>" + " " * 200):
            if closed.done() or time.monotonic() - t0 > for_s:
                break
            try:
                proc.stdin.write(bytes([b]))
            except (BrokenPipeError, asyncssh.Error):
                break
            await asyncio.sleep(every)
        try:
            return await asyncio.wait_for(closed, 1.0)
        except asyncio.TimeoutError:
            return float("inf")
        finally:
            task.cancel()


def test_bytes_trickling_into_a_request_do_not_keep_a_session_past_its_idle_timeout(tmp_path: Path) -> None:
    a = RunningAgent(tmp_path, idle_timeout=1.0)
    try:
        took = asyncio.run(_trickle_request(a.port, 0.2, 4.0))
        assert took < 2.0, f"a request trickling a byte every 0.2 s kept the session {took:.1f} s"
    finally:
        a.stop()
