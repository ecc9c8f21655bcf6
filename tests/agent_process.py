"""A real ``natmig agent`` subprocess on 127.0.0.1 (MemoryProvider), for tests that measure it from outside.

Memory is read from /proc (VmRSS now, VmHWM the peak since start or since
:meth:`AgentProcess.reset_peak`); the process is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh

from natmig.agent.auth import set_password
from natmig.codec import NETCONF_NS
from natmig.framing import EOM

HELLO_10 = f'<hello xmlns="{NETCONF_NS}"><capabilities><capability>urn:ietf:params:netconf:base:1.0</capability></capabilities></hello>'.encode()
HELLO_11 = f'<hello xmlns="{NETCONF_NS}"><capabilities><capability>urn:ietf:params:netconf:base:1.1</capability></capabilities></hello>'.encode()


class AgentProcess:
    """``natmig agent --provider memory --listen 127.0.0.1:0`` with a password file; ``args`` are added."""

    def __init__(self, tmp: Path, *args: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        set_password(tmp / "passwords", "natmig", "secret")
        ready = tmp / "ready"
        self.log = tmp / "agent.log"
        argv = [sys.executable, "-m", "natmig.cli", "-v", "agent", "--provider", "memory", "--listen", "127.0.0.1:0",
                "--host-key", str(tmp / "host_key"), "--passwords", str(tmp / "passwords"), "--ready-file", str(ready), *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() or not ready.read_text().endswith("\n"):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)
            self.port = int(ready.read_text().split()[1])
        except BaseException:
            self.stop()
            raise

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def rss_mb(self) -> float:
        """Resident memory now, MB."""
        return self._status("VmRSS")

    def peak_mb(self) -> float:
        """The most resident memory since start or :meth:`reset_peak`, MB."""
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        """Start measuring the peak afresh (clear_refs 5 resets VmHWM)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def settle(self, above: float, within: float = 5.0) -> float:
        """Wait until RSS is at most ``above`` MB (or ``within`` s passed); the RSS then."""
        end = time.monotonic() + within
        while (rss := self.rss_mb()) > above and time.monotonic() < end:
            time.sleep(0.1)
        return rss

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "AgentProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Channel:
    """A raw netconf channel (base:1.1 after the hello): what a hostile or broken client can send."""

    def __init__(self, conn: asyncssh.SSHClientConnection, proc: Any) -> None:
        self.conn = conn
        self.proc = proc

    @classmethod
    async def open(cls, port: int, hello: bytes = HELLO_11) -> "Channel":
        conn = await asyncssh.connect("127.0.0.1", port, username="natmig", password="secret", known_hosts=None)
        proc = await conn.create_process(subsystem="netconf", encoding=None)
        proc.stdin.write(hello + EOM)
        got = b""
        while EOM not in got:
            data = await asyncio.wait_for(proc.stdout.read(1 << 16), 10)
            if not data:
                break
            got += data
        return cls(conn, proc)

    async def send(self, data: bytes) -> None:
        """Write and wait until SSH took it."""
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            self.proc.stdin.write(bytes(view[i : i + (1 << 20)]))
            await self.proc.stdin.drain()

    async def read_reply(self, timeout: float = 60.0) -> bytes:
        """Everything up to the end of the next rpc-reply (or until the channel closes)."""
        out = b""
        end = time.monotonic() + timeout
        while b"</rpc-reply>" not in out and time.monotonic() < end:
            try:
                data = await asyncio.wait_for(self.proc.stdout.read(1 << 16), end - time.monotonic())
            except asyncio.TimeoutError:
                break
            if not data:
                break
            out += data
        return out

    async def closed_within(self, timeout: float) -> bool:
        """Whether the agent ends the channel within ``timeout`` s (whatever it sends meanwhile is read and dropped)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data = await asyncio.wait_for(self.proc.stdout.read(1 << 16), end - time.monotonic())
            except asyncio.TimeoutError:
                return False
            if not data:
                return True
        return False

    def close(self) -> None:
        self.conn.close()


def chunked(message: bytes, size: int | None = None) -> bytes:
    """``message`` in RFC 6242 chunks of ``size`` bytes (one chunk without)."""
    size = size or len(message)
    return b"".join(b"\n#%d\n" % len(message[i : i + size]) + message[i : i + size] for i in range(0, len(message), size)) + b"\n##\n"


def edit_config(body: bytes, mid: int = 1) -> bytes:
    """An edit-config of running whose <config> holds ``body``."""
    return (f'<rpc xmlns="{NETCONF_NS}" message-id="{mid}"><edit-config><target><running/></target><config>'.encode()
            + body + b"</config></edit-config></rpc>")
