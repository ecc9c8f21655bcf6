"""NETCONF call home (RFC 8071) between real agents and the controller's listener and registry, over SSH on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from natmig.agent.callhome import CallHomeTarget, call_home
from natmig.controller.callhome import CallHomeListener, load_allow_list
from natmig.controller.engine import EngineMigration, EngineOptions
from natmig.controller.registry import AgentEntry, Registry
from natmig.errors import ControllerError

from .test_engine import Served, entries


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Home:
    """A listener and a registry on 127.0.0.1, and the agents calling them."""

    def __init__(self, tmp: Path, agents: list[Served], port: int = 0, keepalive: float = 0.5) -> None:
        allow = tmp / "allowed"
        allow.write_text("".join(f"{a.name} {(a.tmp / 'host_key.pub').read_text().strip()}\n" for a in agents))
        self.events: list[tuple[str, str]] = []
        self.registry = Registry(keepalive=keepalive, on_event=lambda n, ev, e: self.events.append((n, ev)))
        self.allowed = load_allow_list(allow)
        self.listener: CallHomeListener | None = None
        self.port = port
        self.stops: list[tuple[Served, asyncio.Event]] = []

    def listen(self) -> None:
        self.listener = CallHomeListener("127.0.0.1", self.port, self.allowed, self.registry.attach, password="secret")
        self.port = self.listener.port

    def dial(self, a: Served) -> None:
        async def start() -> asyncio.Event:
            stop = asyncio.Event()
            asyncio.ensure_future(call_home(a.agent, CallHomeTarget("127.0.0.1", self.port), stop))
            return stop
        self.stops.append((a, asyncio.run_coroutine_threadsafe(start(), a.loop).result(5)))

    def up(self) -> dict[str, AgentEntry]:
        return {e.name: e for e in self.registry.entries() if e.up}

    def close(self) -> None:
        for a, stop in self.stops:
            if not a.stopped:
                a.loop.call_soon_threadsafe(stop.set)
        if self.listener is not None:
            self.listener.close()
        self.registry.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    agents = [Served(tmp_path / "lb1", "lb1"), Served(tmp_path / "lb2", "lb2")]
    try:
        yield agents
    finally:
        for a in agents:
            a.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agents_started_before_the_controller_register_once_it_is_up(tmp_path: Path, served: list[Served]) -> None:
    home = Home(tmp_path, served, port=free_port())
    try:
        for a in served:
            home.dial(a)  # nobody listens yet: they keep dialling
        time.sleep(1.0)
        home.listen()
        wait_for(lambda: set(home.up()) == {"lb1", "lb2"})
        e = home.up()["lb1"]
        assert e.modules == ["lb-binding@2026-12-03"] and e.admission is True
        assert e.tables["lb-binding:binding"] == (0, "0000000000000000")
        assert sorted(home.events) == [("lb1", "up"), ("lb2", "up")]
    finally:
        home.close()


def test_an_agent_not_on_the_allow_list_is_refused(tmp_path: Path, served: list[Served], caplog: pytest.LogCaptureFixture) -> None:
    stranger = Served(tmp_path / "stranger", "stranger")
    home = Home(tmp_path, served)  # the stranger's key is not on the list
    try:
        home.listen()
        home.dial(stranger)
        home.dial(served[0])
        wait_for(lambda: "lb1" in home.up())
        wait_for(lambda: "host key is not in the allow-list" in caplog.text)
        assert "stranger" not in {e.name for e in home.registry.entries()}
    finally:
        home.close()
        stranger.stop()


def test_an_agent_that_dies_shows_as_down_and_cannot_be_migrated(tmp_path: Path, served: list[Served]) -> None:
    home = Home(tmp_path, served, keepalive=0.5)
    try:
        home.listen()
        for a in served:
            home.dial(a)
        wait_for(lambda: set(home.up()) == {"lb1", "lb2"})
        t0 = time.monotonic()
        served[1].stop()
        # Down within a keepalive and the failed read (the SSH session's end is seen at once); the
        # bound leaves room for a loaded machine: it is the stated guarantee, not a speed figure.
        wait_for(lambda: ("lb2", "down") in home.events, timeout=10)
        assert time.monotonic() - t0 < 10.0
        with pytest.raises(ControllerError, match="agent lb2 is down"):
            home.registry.take("lb2")
        with pytest.raises(ControllerError, match="never called home"):
            home.registry.take("lb9")
    finally:
        home.close()


def test_a_migration_on_the_registered_sessions_connects_to_nothing(tmp_path: Path, served: list[Served]) -> None:
    home = Home(tmp_path, served)
    try:
        home.listen()
        for a in served:
            home.dial(a)
        wait_for(lambda: set(home.up()) == {"lb1", "lb2"})
        served[0].load(*entries(100))
        reg = home.registry
        m = EngineMigration(lambda: reg.take("lb1"), lambda: reg.take("lb2"), "lb1", "lb2", EngineOptions(), close_nodes=False)
        try:
            r = m.run()
        finally:
            reg.give_back("lb1")
            reg.give_back("lb2")
        assert r.ok, r.text()
        assert r.connect_seconds < 0.01  # the sessions were there
        after = {e.name: e for e in reg.entries()}
        assert after["lb2"].tables["lb-binding:binding"][0] == 100 and after["lb1"].tables["lb-binding:binding"][0] == 0
        assert after["lb1"].up and after["lb2"].up  # the sessions stay open
        with pytest.raises(ControllerError, match="in a migration already"):
            reg.take("lb1"), reg.take("lb1")
        reg.give_back("lb1")
        # The way back, on the same sessions: the agents' libraries are the ones compiled at registration
        # (same content-id), so the preflight fetches and compiles nothing.
        fetched: list[str] = []
        for name in ("lb1", "lb2"):
            client = reg.take(name).client
            reg.give_back(name)
            real = client.get_schema
            client.get_schema = lambda ident, version=None, real=real: fetched.append(ident) or real(ident, version)  # type: ignore[method-assign]
        m = EngineMigration(lambda: reg.take("lb2"), lambda: reg.take("lb1"), "lb2", "lb1", EngineOptions(), close_nodes=False)
        try:
            back = m.run()
        finally:
            reg.give_back("lb1")
            reg.give_back("lb2")
        assert back.ok, back.text()
        assert fetched == []
        assert {e.name: e for e in reg.entries()}["lb1"].tables["lb-binding:binding"][0] == 100
    finally:
        home.close()
