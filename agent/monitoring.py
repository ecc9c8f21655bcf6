"""What the agent says about itself: capabilities, served schemas, netconf-state (RFC 6022), yang-library (RFC 8525).

The schema catalog holds the YANG text of the agent's own modules and of the
modules a client needs to compile them or to read netconf-state and the
yang-library (the IETF ones taken from the copies pyang ships), so a client
with nothing installed can fetch all of them with get-schema.  The same
catalog is the agent's ietf-yang-library (RFC 8525), which is how a
controller learns which state modules an agent serves.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import pyang

from ..codec import NETCONF_NS
from ..schema import Schema
from ..statemodel import StateModule, common_module

MONITORING_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
WITH_DEFAULTS_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
BASE_10 = "urn:ietf:params:netconf:base:1.0"
BASE_11 = "urn:ietf:params:netconf:base:1.1"
_PYANG_MODULES = Path(pyang.__file__).resolve().parents[4] / "share" / "yang" / "modules" / "ietf"
#: Protocol modules the agent implements, besides its own.
_PROTOCOL_MODULES = ("ietf-netconf-monitoring", "ietf-netconf-with-defaults", "ietf-yang-library")
#: Type libraries a client needs to compile them (and nat-session).
_TYPE_MODULES = ("ietf-inet-types", "ietf-yang-types", "ietf-datastores")
YANG_LIBRARY_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
YANG_LIBRARY_CAPABILITY = "urn:ietf:params:netconf:capability:yang-library:1.1"
DATASTORES_NS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
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
    """The modules served by get-schema and listed in the yang-library, and the capabilities announced in hello.

    ``implemented`` are the agent's own modules (nat-session, or the state
    module it serves, and natmig-state); ``served`` are the modules they
    import, served so that a client with nothing installed can compile
    them.  The protocol modules (monitoring, with-defaults, yang-library)
    are added here.
    """

    def __init__(self, implemented: list[SchemaEntry], served: list[SchemaEntry], optional_capabilities: list[str]) -> None:
        self.implemented = list(implemented)
        for name in _PROTOCOL_MODULES:
            path = _PYANG_MODULES / f"{name}.yang"
            if path.exists():
                self.implemented.append(_entry(path, name))
        names = {e.identifier for e in self.implemented}
        self.imported = [e for e in served if e.identifier not in names]
        for name in _TYPE_MODULES:
            path = _PYANG_MODULES / f"{name}.yang"
            if name not in names | {e.identifier for e in self.imported} and path.exists():
                self.imported.append(_entry(path, name))
        self.entries = self.implemented + self.imported
        # RFC 8525 3: changes whenever the set of modules does; it never does while the agent runs.
        self.content_id = hashlib.sha256("".join(f"{e.identifier}@{e.version};" for e in self.entries).encode()).hexdigest()[:16]
        self.capabilities = [BASE_10, BASE_11, *optional_capabilities,
                             f"{YANG_LIBRARY_CAPABILITY}?revision=2019-01-04&content-id={self.content_id}"]
        for e in self.implemented:
            # Implemented modules are also announced in hello (RFC 6020 5.6.4), for
            # clients that read no yang-library; the type libraries are only served.
            self.capabilities.append(f"{e.namespace}?module={e.identifier}&revision={e.version}")

    @classmethod
    def for_schema(cls, schema: Schema, optional_capabilities: list[str]) -> "Catalog":
        """The NAT agent's catalog: nat-session and natmig-state (its nat-control and nat-statistics seen through the common module)."""
        common = common_module()
        own = [SchemaEntry(schema.module, schema.revision, schema.namespace, schema.source_path.read_text()),
               SchemaEntry(common.name, common.revision, common.namespace, common.texts[common.name])]
        return cls(own, [], optional_capabilities)

    @classmethod
    def for_module(cls, module: StateModule, common: StateModule, optional_capabilities: list[str]) -> "Catalog":
        """A state agent's catalog: its state module, natmig-state, and every module they import."""
        return cls.for_modules([module], common, optional_capabilities)

    @classmethod
    def for_modules(cls, modules: Sequence[StateModule], common: StateModule, optional_capabilities: list[str]) -> "Catalog":
        """A state agent's catalog: its state modules, natmig-state, and every module they import (each once)."""
        mods = [*modules, common]
        names = {m.name for m in mods}
        own = [SchemaEntry(m.name, m.revision, m.namespace, m.texts[m.name]) for m in mods]
        imported = {n: t for m in mods for n, t in m.texts.items() if n not in names}
        served = [SchemaEntry(n, *_revision_and_ns(t), t) for n, t in imported.items()]
        return cls(own, served, optional_capabilities)

    def find(self, identifier: str, version: str | None) -> list[SchemaEntry]:
        """Entries matching get-schema's identifier and (optional) version."""
        return [e for e in self.entries if e.identifier == identifier and (not version or e.version == version)]

    def hello(self, session_id: int) -> bytes:
        """The server's hello message."""
        caps = "".join(f"<capability>{escape(c)}</capability>" for c in self.capabilities)
        return f'<hello xmlns="{NETCONF_NS}"><capabilities>{caps}</capabilities><session-id>{session_id}</session-id></hello>'.encode()

    def yang_library(self) -> bytes:
        """The ietf-yang-library container (RFC 8525): one module set, one schema, for both datastores."""
        def module(e: SchemaEntry) -> str:
            return (f"<name>{e.identifier}</name><revision>{e.version}</revision>"
                    f"<namespace>{escape(e.namespace)}</namespace>")  # no location: the text is served by get-schema
        mods = "".join(f"<module>{module(e)}</module>" for e in self.implemented)
        imps = "".join(f"<import-only-module>{module(e)}</import-only-module>" for e in self.imported)
        ds = "".join(f'<datastore><name xmlns:ds="{DATASTORES_NS}">ds:{n}</name><schema>natmig</schema></datastore>' for n in ("running", "candidate"))
        return (f'<yang-library xmlns="{YANG_LIBRARY_NS}"><module-set><name>natmig</name>{mods}{imps}</module-set>'
                f"<schema><name>natmig</name><module-set>natmig</module-set></schema>{ds}"
                f"<content-id>{self.content_id}</content-id></yang-library>").encode()


def _revision_and_ns(text: str) -> tuple[str, str]:
    rev = _REVISION.search(text)
    ns = _NAMESPACE.search(text)
    return (rev.group(1) if rev else "", ns.group(1) if ns else "")


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
