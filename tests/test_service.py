"""The controller service in this process: agents call home, its NETCONF northbound lists them and runs migrations."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from ncclient import manager

from natmig.agent.auth import set_password
from natmig.controller.netconf import NodeClient
from natmig.controller.northbound import NS
from natmig.controller.service import Service, load_config
from natmig.errors import ControllerError

from .test_callhome import wait_for
from .test_engine import Served, entries
from natmig.agent.callhome import CallHomeTarget, call_home


class Running:
    def __init__(self, tmp: Path, agents: list[Served]) -> None:
        (tmp / "allow").write_text("".join(f"{a.name} {(a.tmp / 'host_key.pub').read_text().strip()}\n" for a in agents))
        (tmp / "secret").write_text("secret\n")
        set_password(tmp / "nb-passwords", "ops", "nb-secret")
        (tmp / "c.toml").write_text(
            f'[call_home]\nlisten = "127.0.0.1:0"\nallow = "{tmp / "allow"}"\npassword_file = "{tmp / "secret"}"\nkeepalive = 0.5\n'
            f'[northbound]\nlisten = "127.0.0.1:0"\nhost_key = "{tmp / "nb_key"}"\npasswords = "{tmp / "nb-passwords"}"\n')
        self.service = Service(load_config(tmp / "c.toml"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.northbound.start(), self.loop).result(10)
        self.tmp = tmp
        pub = (tmp / "nb_key.pub").read_text().split()
        (tmp / "nb_known").write_text(f"[127.0.0.1]:{self.service.northbound.port} {pub[0]} {pub[1]}\n")
        self.stops: list[tuple[Served, asyncio.Event]] = []
        for a in agents:
            async def start(a: Served = a) -> asyncio.Event:
                stop = asyncio.Event()
                asyncio.ensure_future(call_home(a.agent, CallHomeTarget("127.0.0.1", self.service.listener.port), stop))
                return stop
            self.stops.append((a, asyncio.run_coroutine_threadsafe(start(), a.loop).result(5)))

    def client(self) -> NodeClient:
        return NodeClient.connect("127.0.0.1", self.service.northbound.port, "ops", password="nb-secret", known_hosts=str(self.tmp / "nb_known"), timeout=30)

    def close(self) -> None:
        for a, stop in self.stops:
            if not a.stopped:
                a.loop.call_soon_threadsafe(stop.set)
        time.sleep(0.1)
        self.loop.call_soon_threadsafe(self.service.close)
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Running, list[Served]]]:
    agents = [Served(tmp_path / "lb1", "lb1"), Served(tmp_path / "lb2", "lb2")]
    r = Running(tmp_path, agents)
    try:
        wait_for(lambda: {e.name for e in r.service.registry.entries() if e.up} == {"lb1", "lb2"})
        yield r, agents
    finally:
        r.close()
        for a in agents:
            a.stop()


def migrate(c: NodeClient, source: str, target: str) -> dict[str, str | None]:
    reply = c.call("migrate", f'<migrate xmlns="{NS}"><source>{source}</source><target>{target}</target></migrate>')
    return {k: reply.findtext(f"{{{NS}}}{k}") for k in ("ok", "failed-phase", "error", "report")}


def test_a_third_party_client_lists_the_agents_starts_a_migration_and_watches_it(running: tuple[Running, list[Served]]) -> None:
    r, (lb1, lb2) = running
    lb1.load(*entries(120))
    m = manager.connect(host="127.0.0.1", port=r.service.northbound.port, username="ops", password="nb-secret", hostkey_verify=False,
                        allow_agent=False, look_for_keys=False, timeout=30)
    try:
        agents = m.get(filter=("subtree", f'<agents xmlns="{NS}"/>')).data_ele
        names = [a.findtext(f"{{{NS}}}name") for a in agents.iter(f"{{{NS}}}agent")]
        assert names == ["lb1", "lb2"]
        assert agents.findtext(f".//{{{NS}}}module") == "lb-binding@2026-12-03"
        m.create_subscription()
        with r.client() as c:
            out = migrate(c, "lb1", "lb2")
        assert out["ok"] == "true", out["report"]
        assert "lb2: admits new entries; lb-binding:backend 0 (digest 0000000000000000), lb-binding:binding 120" in (out["report"] or "")
        phases = []
        deadline = time.monotonic() + 5
        while len(phases) < 7 and time.monotonic() < deadline:
            n = m.take_notification(block=True, timeout=1)
            if n is not None and n.notification_ele.find(f".//{{{NS}}}phase") is not None:
                phases.append(n.notification_ele.findtext(f".//{{{NS}}}phase"))
        assert phases == ["preflight", "copy", "freeze", "catch-up", "verify", "switch", "finish"]
    finally:
        m.close_session()


def test_a_migration_to_an_agent_that_is_down_is_refused_before_anything_changes(running: tuple[Running, list[Served]]) -> None:
    r, (lb1, lb2) = running
    lb1.load(*entries(10))
    lb2.stop()
    wait_for(lambda: not next(e for e in r.service.registry.entries() if e.name == "lb2").up, timeout=5)
    with r.client() as c:
        out = migrate(c, "lb1", "lb2")
    assert out["ok"] == "false" and "agent lb2 is down" in (out["error"] or "")
    with lb1.node() as n:
        assert n.admission() is True and n.statistics()["lb-binding:binding"][0] == 10


def test_two_clients_asking_for_the_same_nodes_get_one_refused(running: tuple[Running, list[Served]]) -> None:
    r, (lb1, lb2) = running
    lb1.load(*entries(5000))
    results: list[dict[str, str | None]] = []

    def ask() -> None:
        with r.client() as c:
            results.append(migrate(c, "lb1", "lb2"))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    oks = sorted(x["ok"] or "" for x in results)
    assert oks == ["false", "true"], results
    refused = next(x for x in results if x["ok"] == "false")
    assert "in a migration already" in (refused["error"] or "") or "in use" in (refused["error"] or "")


def test_the_config_file_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[call_home]\nallow = "x"\npassword_file = "p"\n[northbound]\nlisten = "127.0.0.1:0"\nfrobs = 1\n')
    with pytest.raises(ControllerError, match="northbound.frobs: unknown key"):
        load_config(bad)
    bad.write_text('[call_home]\nallow = "x"\n[northbound]\nlisten = "127.0.0.1:0"\n')
    with pytest.raises(ControllerError, match="give password_file or key"):
        load_config(bad)


def test_the_controller_units_execstart_runs_and_notifies_readiness(tmp_path: Path) -> None:
    import os
    import shlex
    import signal
    import socket
    import subprocess
    import sys

    unit = Path(__file__).resolve().parent.parent / "systemd" / "natmig-controller.service.in"
    line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart=").replace("@NATMIG@", str(Path(sys.executable).parent / "natmig")).replace("@SYSCONFDIR@", str(tmp_path)))
    (tmp_path / "natmig").mkdir()
    (tmp_path / "allow").write_text("")
    (tmp_path / "secret").write_text("s\n")
    set_password(tmp_path / "nbpw", "ops", "x")
    (tmp_path / "natmig" / "controller.toml").write_text(
        f'[call_home]\nlisten = "127.0.0.1:0"\nallow = "{tmp_path / "allow"}"\npassword_file = "{tmp_path / "secret"}"\n'
        f'[northbound]\nlisten = "127.0.0.1:0"\nhost_key = "{tmp_path / "nbkey"}"\npasswords = "{tmp_path / "nbpw"}"\n')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.splitlines() and f"MAINPID={proc.pid}" in msg and "northbound on 127.0.0.1:" in msg, msg
        os.kill(proc.pid, signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        notify.close()
