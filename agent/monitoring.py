"""What the agent says about itself: capabilities, served schemas, netconf-state (RFC 6022).

The schema catalog holds the YANG text of nat-session and of the modules a
client needs to compile it or to read netconf-state (ietf-inet-types,
ietf-yang-types, ietf-netconf-monitoring, ietf-netconf-with-defaults, taken
from the copies pyang ships), so a client with nothing installed can fetch
all of them with get-schema.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pyang

from ..codec import NETCONF_NS
from ..schema import Schema

MONITORING_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
WITH_DEFAULTS_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
BASE_10 = "urn:ietf:params:netconf:base:1.0"
BASE_11 = "urn:ietf:params:netconf:base:1.1"
_PYANG_MODULES = Path(pyang.__file__).resolve().parents[4] / "share" / "yang" / "modules" / "ietf"
_EXTRA_MODULES = ("ietf-inet-types", "ietf-yang-types", "ietf-netconf-monitoring", "ietf-netconf-with-defaults")
_REVISION = re.compile(r"^\s*revision\s+\"?(\d{4}-\d{2}-\d{2})", re.M)
_NAMESPACE = re.compile(r"^\s*namespace\s+\"?([^\";\s]+)", re.M)


@dataclass(frozen=True)
class SchemaEntry:
    """One module the agent serves with get-schema."""

    identifier: str
    version: str
    namespace: str
    text: str


def _entry(path: Path, name: str) -> SchemaEntry:
    text = path.read_text()
    rev = _REVISION.search(text)
    ns = _NAMESPACE.search(text)
    return SchemaEntry(name, rev.group(1) if rev else "", ns.group(1) if ns else "", text)


class Catalog:
    """The modules served by get-schema, and the capabilities announced in hello."""

    def __init__(self, schema: Schema, optional_capabilities: list[str]) -> None:
        self.schema = schema
        self.entries = [SchemaEntry(schema.module, schema.revision, schema.namespace, schema.source_path.read_text())]
        for name in _EXTRA_MODULES:
            path = _PYANG_MODULES / f"{name}.yang"
            if path.exists():
                self.entries.append(_entry(path, name))
        self.capabilities = [BASE_10, BASE_11, *optional_capabilities]
        for e in self.entries:
            if e.identifier in (schema.module, "ietf-netconf-monitoring", "ietf-netconf-with-defaults"):
                # Implemented modules are announced (RFC 6020 5.6.4); the
                # type libraries are only served, not implemented.
                self.capabilities.append(f"{e.namespace}?module={e.identifier}&revision={e.version}")

    def find(self, identifier: str, version: str | None) -> list[SchemaEntry]:
        """Entries matching get-schema's identifier and (optional) version."""
        return [e for e in self.entries if e.identifier == identifier and (not version or e.version == version)]

    def hello(self, session_id: int) -> bytes:
        """The server's hello message."""
        caps = "".join(f"<capability>{escape(c)}</capability>" for c in self.capabilities)
        return f'<hello xmlns="{NETCONF_NS}"><capabilities>{caps}</capabilities><session-id>{session_id}</session-id></hello>'.encode()


@dataclass
class SessionRecord:
    """What netconf-state/sessions reports of one NETCONF session."""

    session_id: int
    username: str
    source_host: str
    login_time: float
    in_rpcs: int = 0
    in_bad_rpcs: int = 0
    out_rpc_errors: int = 0
    out_notifications: int = 0


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def netconf_state(catalog: Catalog, sessions: list[SessionRecord], locks: dict[str, int], started: float, parts: set[str] | None) -> bytes:
    """The netconf-state container; ``parts`` names the children to include (None: all)."""
    out: list[str] = []

    def want(name: str) -> bool:
        return parts is None or name in parts

    if want("capabilities"):
        out.append("<capabilities>" + "".join(f"<capability>{escape(c)}</capability>" for c in catalog.capabilities) + "</capabilities>")
    if want("datastores"):
        ds = []
        for name in ("running", "candidate"):
            lock = ""
            if name in locks:
                lock = f"<locks><global-lock><locked-by-session>{locks[name]}</locked-by-session><locked-time>{_ts(time.time())}</locked-time></global-lock></locks>"
            ds.append(f"<datastore><name>{name}</name>{lock}</datastore>")
        out.append("<datastores>" + "".join(ds) + "</datastores>")
    if want("schemas"):
        out.append("<schemas>" + "".join(
            f"<schema><identifier>{e.identifier}</identifier><version>{e.version}</version><format>yang</format>"
            f"<namespace>{escape(e.namespace)}</namespace><location>NETCONF</location></schema>" for e in catalog.entries
        ) + "</schemas>")
    if want("sessions"):
        out.append("<sessions>" + "".join(
            f"<session><session-id>{s.session_id}</session-id><transport>netconf-ssh</transport>"
            f"<username>{escape(s.username)}</username><source-host>{escape(s.source_host)}</source-host>"
            f"<login-time>{_ts(s.login_time)}</login-time><in-rpcs>{s.in_rpcs}</in-rpcs><in-bad-rpcs>{s.in_bad_rpcs}</in-bad-rpcs>"
            f"<out-rpc-errors>{s.out_rpc_errors}</out-rpc-errors><out-notifications>{s.out_notifications}</out-notifications></session>"
            for s in sessions
        ) + "</sessions>")
    if want("statistics"):
        out.append(
            f"<statistics><netconf-start-time>{_ts(started)}</netconf-start-time>"
            f"<in-sessions>{len(sessions)}</in-sessions>"
            f"<in-rpcs>{sum(s.in_rpcs for s in sessions)}</in-rpcs></statistics>"
        )
    return f'<netconf-state xmlns="{MONITORING_NS}">{"".join(out)}</netconf-state>'.encode()
