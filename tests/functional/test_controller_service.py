"""`natmig controller` with agents calling home (processes, in a namespace of this test), driven by netconf-console2 and the CLI."""

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

from .test_engine_cli import NATMIG, ROOT, binding

pytestmark = pytest.mark.root

CTL = "192.0.2.254"
AGENTS = {"lb1": "192.0.2.1", "lb2": "192.0.2.2"}
NC_NS = "urn:natmig:yang:natmig-controller"


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.ns = tmp, f"nmcs{os.getpid() % 100000}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        tmp = self.tmp
        netns.add(self.ns)
        for a in [CTL, *AGENTS.values()]:
            netns.run(["ip", "addr", "add", f"{a}/32", "dev", "lo"], self.ns)
        for f, user, pw in (("passwords", "natmig", "secret"), ("nb-passwords", "ops", "nb-secret")):
            subprocess.run([*NATMIG, "agent", "passwd", str(tmp / f), user, "--password-stdin"], input=f"{pw}\n".encode(), check=True, capture_output=True)
        (tmp / "secret").write_text("secret\n")
        (tmp / "nb-secret").write_text("nb-secret\n")
        # Agents first: they dial a controller that is not there yet, and keep dialling.
        for name, addr in AGENTS.items():
            self.spawn(name, ["agent", "--provider", "memory", "--module", str(ROOT / "examples" / "lb-binding.yang"), "--netns", self.ns,
                              "--listen", f"{addr}:830", "--call-home", f"{CTL}:4334", "--passwords", str(tmp / "passwords"),
                              "--host-key", str(tmp / f"{name}.key")])
        for name in AGENTS:
            self.wait_file(tmp / f"{name}.ready")
        (tmp / "allow").write_text("".join(f"{n} {(tmp / f'{n}.key.pub').read_text().strip()}\n" for n in AGENTS))
        (tmp / "controller.toml").write_text(
            f'netns = "{self.ns}"\n[call_home]\nlisten = "{CTL}:4334"\nallow = "{tmp / "allow"}"\npassword_file = "{tmp / "secret"}"\nkeepalive = 1\n'
            f'[northbound]\nlisten = "{CTL}:8300"\nhost_key = "{tmp / "nb.key"}"\npasswords = "{tmp / "nb-passwords"}"\n')
        self.spawn("controller", ["controller", "--config", str(tmp / "controller.toml")])
        self.wait_file(tmp / "controller.ready")
        pub = (tmp / "nb.key.pub").read_text().split()
        (tmp / "known_hosts").write_text(f"[{CTL}]:8300 {pub[0]} {pub[1]}\n")
        (tmp / "inventory.toml").write_text(
            f'[controller]\nhost = "{CTL}"\nport = 8300\nusername = "ops"\npassword_file = "{tmp / "nb-secret"}"\n'
            f'known_hosts = "{tmp / "known_hosts"}"\nnetns = "{self.ns}"\n\n[migration]\nsource = "lb1"\ntarget = "lb2"\n')

    def spawn(self, name: str, argv: list[str]) -> None:
        self.procs[name] = subprocess.Popen([*NATMIG, *argv, "--ready-file", str(self.tmp / f"{name}.ready")],
                                            stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"{name}.log", "wb"))

    def wait_file(self, path: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, "\n".join(p.read_text() for p in self.tmp.glob("*.log"))
            time.sleep(0.05)

    def console(self, *args: str) -> str:
        """netconf-console2 against the controller's northbound, from the namespace."""
        cp = subprocess.run(["ip", "netns", "exec", self.ns, str(Path(sys.executable).with_name("netconf-console2")), "--host", CTL, "--port", "8300",
                             "-u", "ops", "-p", "nb-secret", *args], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout

    def agents(self) -> str:
        return self.console("--get")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        netns.delete(self.ns)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def until(cond: "callable[[], bool]", timeout: float = 15) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_agents_call_home_and_a_migration_goes_through_the_controller(site: Site) -> None:
    until(lambda: site.agents().count("<up>true</up>") == 2)  # agents started first registered once it was up
    from natmig.controller.netconf import NodeClient

    def load() -> None:
        with NodeClient.connect(AGENTS["lb1"], 830, "natmig", password="secret", hostkey_verify=False, timeout=10) as c:
            c.edit_config("".join(binding(i) for i in range(500)), target="running")
    netns.call_in(site.ns, load)
    cp = subprocess.run([*NATMIG, "migrate", "-i", str(site.tmp / "inventory.toml"), "--controller", "--json", str(site.tmp / "r.json")],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "state migration lb1 -> lb2: OK" in cp.stdout and "Traceback" not in cp.stderr
    report = json.loads((site.tmp / "r.json").read_text())
    assert report["ok"] and "preflight" in report["report"]
    out = site.agents()
    assert "<entries>500</entries>" in out  # lb2's binding list, as the controller last read it


def test_a_dead_agent_shows_as_down_and_a_migration_to_it_is_refused(site: Site) -> None:
    until(lambda: site.agents().count("<up>true</up>") == 2)
    t0 = time.monotonic()
    site.procs["lb2"].send_signal(signal.SIGKILL)
    site.procs["lb2"].wait(5)
    until(lambda: site.agents().count("<up>false</up>") == 1, timeout=10)
    down_after = time.monotonic() - t0
    assert down_after < 6.0  # keepalive 1 s; the stated bound (docs) is keepalive + the read's failure
    cp = subprocess.run([*NATMIG, "migrate", "-i", str(site.tmp / "inventory.toml"), "--controller"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1 and "agent lb2 is down" in cp.stdout
