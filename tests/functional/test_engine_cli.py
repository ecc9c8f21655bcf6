"""`natmig migrate` with switch = "none": two state agents (real processes, in a namespace of this test) and the CLI.

The agents serve examples/lb-binding.yang from memory on 192.0.2.1 and
192.0.2.2 inside a namespace this test creates; the inventory names that
namespace, so the controller connects from it and nothing leaves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from natmig import netns
from natmig.controller.netconf import NodeClient

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
NATMIG = [sys.executable, "-m", "natmig.cli"]
NS = "urn:natmig:yang:example:lb-binding"
ADDRS = {"lb1": "192.0.2.1", "lb2": "192.0.2.2"}


def binding(i: int, snat: int | None = None, client: str | None = None) -> str:
    return (f'<binding xmlns="{NS}"><client-address>{client or f"10.0.0.{i % 250 + 1}"}</client-address><client-port>{20000 + i}</client-port>'
            f"<backend-address>198.51.100.10</backend-address><backend-port>80</backend-port><snat-port>{snat or 1024 + i}</snat-port>"
            f"<idle-timeout>120</idle-timeout></binding>")


class Pair:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = f"nmst{os.getpid() % 100000}"
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._start()
        except BaseException:
            self.close()  # whatever was started, stopped by pid; the namespace deleted
            raise

    def _start(self) -> None:
        tmp = self.tmp
        netns.add(self.ns)
        netns.run(["ip", "link", "set", "lo", "up"], self.ns)
        for a in ADDRS.values():
            netns.run(["ip", "addr", "add", f"{a}/32", "dev", "lo"], self.ns)
        subprocess.run([*NATMIG, "agent", "passwd", str(tmp / "passwords"), "natmig", "--password-stdin"], input=b"secret\n", check=True, capture_output=True)
        (tmp / "secret").write_text("secret\n")
        known = []
        for name, addr in ADDRS.items():
            ready = tmp / f"{name}.ready"
            self.procs.append(subprocess.Popen(
                [*NATMIG, "agent", "--provider", "memory", "--module", str(ROOT / "examples" / "lb-binding.yang"), "--netns", self.ns,
                 "--listen", f"{addr}:830", "--passwords", str(tmp / "passwords"), "--host-key", str(tmp / f"{name}.key"), "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb")))
            deadline = time.monotonic() + 20
            while not ready.exists():
                assert time.monotonic() < deadline, (tmp / f"{name}.log").read_text()
                time.sleep(0.05)
            pub = (tmp / f"{name}.key.pub").read_text().split()
            known.append(f"[{addr}]:830 {pub[0]} {pub[1]}")
        (tmp / "known_hosts").write_text("\n".join(known) + "\n")
        agents = "".join(f'[agents.{n}]\nhost = "{a}"\npassword_file = "{tmp / "secret"}"\nknown_hosts = "{tmp / "known_hosts"}"\nnetns = "{self.ns}"\n\n' for n, a in ADDRS.items())
        (tmp / "inventory.toml").write_text(f'switch = "none"\n\n{agents}[migration]\nsource = "lb1"\ntarget = "lb2"\n')

    def client(self, name: str) -> NodeClient:
        def connect() -> NodeClient:
            return NodeClient.connect(ADDRS[name], 830, "natmig", password="secret", known_hosts=str(self.tmp / "known_hosts"), timeout=10)
        return netns.call_in(self.ns, connect)

    def load(self, name: str, *entries: str) -> None:
        with self.client(name) as c:
            c.edit_config("".join(entries), target="running")

    def migrate(self, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
        out = self.tmp / "report.json"
        cp = subprocess.run([*NATMIG, "migrate", "-i", str(self.tmp / "inventory.toml"), "--json", str(out), "-q", *extra],
                            capture_output=True, text=True, timeout=120)
        return cp, json.loads(out.read_text())

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        netns.delete(self.ns)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def test_migrate_moves_a_module_it_never_saw_and_reports_what_the_agents_read_back(pair: Pair) -> None:
    pair.load("lb1", *(binding(i) for i in range(2000)))
    cp, report = pair.migrate()
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "Traceback" not in cp.stderr
    assert report["ok"] and report["modules"] == ["lb-binding@2026-12-03"]
    assert report["copied"]["lb-binding:binding"] == 2000
    assert "no traffic was moved" in report["switch"] and "no traffic was moved" in cp.stdout
    lb2 = report["readback"]["lb2"]["tables"]["lb-binding:binding"]
    lb1 = report["readback"]["lb1"]["tables"]["lb-binding:binding"]
    assert lb2["entries"] == 2000 and lb1 == {"entries": 0, "digest": "0000000000000000"}
    with pair.client("lb2") as c:  # and the target's own get-config holds them
        got = c.get_config_filtered("running", f'<binding xmlns="{NS}"/>')
        assert len(got) == 2000


def test_a_conflict_by_the_modules_unique_is_refused_with_exit_1_and_nothing_changes(pair: Pair) -> None:
    pair.load("lb1", *(binding(i) for i in range(100)))
    pair.load("lb2", binding(0, snat=1050, client="203.0.113.7"))  # lb1's entry 26 uses snat-port 1050 to the same backend
    cp, report = pair.migrate()
    assert cp.returncode == 1
    assert "Traceback" not in cp.stderr
    assert report["failed_phase"] == "copy" and "data-not-unique" not in cp.stdout
    assert 'unique "backend-address backend-port snat-port" violated' in report["error"]
    assert report["readback"]["lb1"]["tables"]["lb-binding:binding"]["entries"] == 100
    assert report["readback"]["lb1"]["admission"] is True
    assert report["readback"]["lb2"]["tables"]["lb-binding:binding"]["entries"] == 1
