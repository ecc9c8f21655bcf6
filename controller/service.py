"""`natmig controller`: the long-running controller that agents call home to.

It keeps one session per agent (:mod:`.registry`), accepts agents as they
call (:mod:`.callhome`), and runs migrations on those sessions when its
northbound (:mod:`.northbound`) is asked to: no connection is opened in a
migration's preflight.  Its configuration is one TOML file (see
docs/controller-service.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .. import netns
from ..agent.server import AgentConfig
from ..agent.service import Notifier
from ..errors import ControllerError
from . import txn
from .callhome import CallHomeListener, load_allow_list
from .engine import EngineMigration, EngineOptions, default_phases, read_back
from .enginereport import EngineReport
from .inventory import SwitchSpec, parse_switch
from .northbound import NS, Northbound
from .registry import AgentEntry, Registry
from .report import PhaseTiming
from .steering import steering_from_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """The controller's configuration file, checked."""

    call_home: tuple[str, int]
    allow: str
    username: str
    password_file: str | None
    key: str | None
    keepalive: float
    northbound: tuple[str, int]
    host_key: str
    passwords: str | None
    authorized_keys: str | None
    netns: str | None
    nacm: str | None = None
    #: the switch a migration points at the target (an inventory's ``[switch]``); None: state transfer only.
    switch: SwitchSpec | None = None

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as e:
            raise ControllerError(f"call_home.password_file: cannot read {self.password_file}: {e}") from e


def _addr(where: str, text: Any, default_port: int) -> tuple[str, int]:
    if not isinstance(text, str) or not text:
        raise ControllerError(f"{where}: give ADDR or ADDR:PORT")
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", str(default_port))
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ControllerError(f"{where}: {text!r}: the port must be 0..65535")
    return host, int(port)


def load_config(path: str | Path) -> ServiceConfig:
    """Read and check the controller's TOML file; errors name the key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ControllerError(f"cannot read {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ControllerError(f"{path}: not TOML: {e}") from e
    known = {"netns": None, "switch": None, "call_home": {"listen", "allow", "username", "password_file", "key", "keepalive"},
             "northbound": {"listen", "host_key", "passwords", "authorized_keys", "nacm"}}
    for k, v in data.items():
        if k not in known:
            raise ControllerError(f"{path}: {k}: unknown key (known: {', '.join(known)})")
        sub = known[k]
        if isinstance(sub, set):
            if not isinstance(v, dict):
                raise ControllerError(f"{path}: {k}: must be a table")
            for kk in v:
                if kk not in sub:
                    raise ControllerError(f"{path}: {k}.{kk}: unknown key (known: {', '.join(sorted(sub))})")
    ch, nb = data.get("call_home", {}), data.get("northbound", {})
    if "allow" not in ch:
        raise ControllerError(f"{path}: call_home.allow: missing (the agents' names and host keys)")
    if "password_file" not in ch and "key" not in ch:
        raise ControllerError(f"{path}: call_home: give password_file or key (how the controller authenticates to agents)")
    if "listen" not in nb:
        raise ControllerError(f"{path}: northbound.listen: missing (where NETCONF clients reach the controller)")
    keepalive = ch.get("keepalive", 5)
    if not isinstance(keepalive, (int, float)) or not 0.1 <= keepalive <= 300:
        raise ControllerError(f"{path}: call_home.keepalive: {keepalive!r} is not a number of seconds in 0.1..300")
    return ServiceConfig(
        call_home=_addr(f"{path}: call_home.listen", ch.get("listen", "0.0.0.0:4334"), 4334),
        allow=str(ch["allow"]), username=str(ch.get("username", "natmig")),
        password_file=ch.get("password_file"), key=ch.get("key"), keepalive=float(keepalive),
        northbound=_addr(f"{path}: northbound.listen", nb["listen"], 830),
        host_key=str(nb.get("host_key", "controller_host_key")), passwords=nb.get("passwords"),
        authorized_keys=nb.get("authorized_keys"), netns=data.get("netns"), nacm=nb.get("nacm"),
        switch=_switch(f"{path}: switch", data["switch"]) if "switch" in data else None,
    )


def _switch(where: str, raw: Any) -> SwitchSpec | None:
    spec = parse_switch(where, raw)  # an InventoryError is a ControllerError
    return None if spec.kind == "none" else spec


class Service:
    """Registry, call-home listener and northbound of one controller."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.northbound = Northbound(AgentConfig(host=config.northbound[0], port=config.northbound[1], host_key=config.host_key,
                                                 passwords=config.passwords, authorized_keys=config.authorized_keys, nacm=config.nacm), self)
        self.registry = Registry(config.keepalive, on_event=self._agent_event)
        self.listener = CallHomeListener(config.call_home[0], config.call_home[1], load_allow_list(config.allow), self._attach,
                                         config.username, config.password(), config.key)

    def _attach(self, client: Any, peer: str) -> None:
        self.registry.attach(client, peer)

    def _agent_event(self, name: str, event: str, entry: AgentEntry) -> None:
        if event == "up":
            self.northbound.notify("agent-up", f'<agent-up xmlns="{NS}"><name>{escape(name)}</name></agent-up>')
        else:
            self.northbound.notify("agent-down", f'<agent-down xmlns="{NS}"><name>{escape(name)}</name><error>{escape(entry.error)}</error></agent-down>')

    def migrate(self, source: str, target: str, retire: str = "delete", confirm_timeout: float = 10.0) -> EngineReport:
        """A migration on the registered sessions; an agent that is down, unknown or busy refuses it before anything changes."""
        if source == target:
            r = EngineReport(source, target, error="the source and the target are the same agent", failed_phase="connect")
            return r

        def phase(p: PhaseTiming) -> None:
            self.northbound.notify("migration-phase", f'<migration-phase xmlns="{NS}"><source>{escape(source)}</source><target>{escape(target)}</target>'
                                   f"<phase>{p.name}</phase><seconds>{p.seconds:.6f}</seconds><ok>{'true' if p.ok else 'false'}</ok></migration-phase>")

        taken: list[str] = []

        def take(name: str) -> Any:
            node = self.registry.take(name)
            taken.append(name)
            return node

        try:
            steering = steering_from_spec(self.config.switch) if self.config.switch is not None else None
        except ControllerError as e:
            return EngineReport(source, target, error=str(e), failed_phase="connect")
        try:
            m = EngineMigration(lambda: take(source), lambda: take(target), source, target,
                                EngineOptions(retire=retire, confirm_timeout=confirm_timeout), default_phases(steering),
                                on_phase=phase, close_nodes=False)
            return m.run()
        finally:
            for name in taken:
                self.registry.give_back(name)

    def recover(self, source: str, target: str) -> EngineReport:
        """Cancel what a migration of this pair left pending on both agents, then read them back."""
        r = EngineReport(source, target)
        token = txn.persist_token(source, target)
        taken = []
        try:
            for name in (source, target):
                node = self.registry.take(name)
                taken.append((name, node))
                if txn.cancel_pending(node, token):
                    r.undone.append(f"{name}: pending confirmed commit {token} cancelled")
            r.ok = True
        except ControllerError as e:
            r.error, r.failed_phase = str(e), "recover"
        finally:
            for name, node in taken:
                r.readback[name] = read_back(node)
                self.registry.give_back(name)
        return r

    def close(self) -> None:
        self.listener.close()
        self.registry.close()
        self.northbound.close()


def run(config_path: str, ready_file: str | None = None) -> int:
    """Serve until SIGTERM or ^C."""
    config = load_config(config_path)
    notifier = Notifier()  # before entering the namespace: systemd's socket is in the host's
    if config.netns:
        netns.enter(config.netns)
    service = Service(config)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await service.northbound.start()
        if ready_file:
            Path(ready_file).write_text(f"{os.getpid()} {service.northbound.port} {service.listener.port}\n")
        where = (f"call home on {config.call_home[0]}:{service.listener.port}, "
                 f"northbound on {config.northbound[0]}:{service.northbound.port}")
        print(f"natmig controller: {where}", file=sys.stderr, flush=True)
        notifier.notify("READY=1", f"STATUS={where}", f"MAINPID={os.getpid()}")
        try:
            await stop.wait()
        finally:
            notifier.notify("STOPPING=1")
            service.close()
            notifier.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
