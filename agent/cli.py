"""`natmig agent`: run the NETCONF agent of one NAT node; `natmig agent passwd`: manage its users.

Namespaces: the agent enters the NAT node's network namespace itself, at
start-up and before any thread exists (:func:`natmig.netns.enter`, the one
place natmig enters a namespace).  Everything the process opens afterwards -- the
listening socket on the management address and the conntrack netlink
sockets -- lives in that namespace.  Re-executing under ``ip netns exec``
would work too, but would hide the agent behind another process image and
remount /sys for no benefit here.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from typing import Callable

from ..codec import default_codec
from ..errors import AgentError, NatmigError
from .. import netns, pool
from . import config as agent_config
from .auth import set_password
from .callhome import CallHomeTarget, call_home
from .exposure import check_listen
from .provider import MemoryProvider, SessionProvider
from .server import Agent, AgentConfig, limit_malloc_arenas
from .service import Notifier, PidFile, keygen, known_hosts_line

log = logging.getLogger(__name__)

#: The public address of --provider memory when none is given.
MEMORY_PUBLIC = ["203.0.113.1"]


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[v6]:PORT`` or ``ADDR`` (port 830)."""
    host, port = text, "830"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "830"
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen {text!r}: port must be 0..65535")
    return host or "0.0.0.0", int(port)


def _call_home_target(text: str) -> CallHomeTarget:
    try:
        return CallHomeTarget.parse(text)
    except AgentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _public_address(text: str) -> str:
    """One --public-address, checked: an address or a range FIRST-LAST of the NAT's pool, with its ports :LOW-HIGH or not (natmig.pool)."""
    try:
        pool.parse_entry("--public-address", text, default_ports=_ANY_PORT)
    except pool.PoolError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


#: what an address given without ports owns (see :class:`natmig.pool.Owned`)
_ANY_PORT = (1, 65535)


def public_addresses(given: list[str] | None) -> list[str]:
    """The addresses every --public-address names (ranges expanded, ports left out), in order.

    :class:`AgentError` when one address is given twice, but for disjoint
    ports of it: a pool whose entries overlap is a typo, not a bigger pool.
    """
    return list(dict.fromkeys(r.address for _, r in _entries(given)))


def public_pool(given: list[str] | None) -> pool.Owned:
    """What the --public-address values own: each address, and its ports where a value gave them (``A:LOW-HIGH``)."""
    return pool.Owned(r if ports else r.address for ports, r in _entries(given))


def _entries(given: list[str] | None) -> list[tuple[bool, pool.PublicRange]]:
    """Each address of the values, with whether its value gave ports; checked as one pool."""
    first: dict[str, tuple[int, bool]] = {}
    out: list[tuple[bool, pool.PublicRange]] = []
    for i, item in enumerate(given or []):
        ports = ":" in item
        for r in pool.parse_entry("--public-address", item, default_ports=_ANY_PORT):
            seen = first.setdefault(r.address, (i, ports))
            if seen != (i, ports) and not (ports and seen[1]):
                raise AgentError(f"--public-address: {r.address} is given twice (in values {seen[0] + 1} and {i + 1}); the pool's addresses must not overlap")
            out.append((ports, r))
    if out:
        pool.check("--public-address", [r for _, r in out])  # two port ranges of one address must be disjoint
    return out


def _memory(args: argparse.Namespace) -> SessionProvider:
    return MemoryProvider(owned=args.public_pool or pool.Owned(MEMORY_PUBLIC))


def _conntrack(args: argparse.Namespace) -> SessionProvider:
    from .conntrack import ConntrackProvider  # needs the kernel's tools; imported only when used
    from .natnode import NatNode, NatNodeConfig

    if not args.public_address:
        raise AgentError("--provider conntrack needs --public-address (the NAT's public address)")
    if not args.netns:
        # The root namespace's table belongs to the machine, never to natmig.
        raise AgentError("--provider conntrack needs --netns (the NAT node's namespace)")
    # Admission control rewrites the node's nftables admission chain, which
    # only needs the namespace, the inside interface and the public addresses
    # (the ports are the SNAT rule's business, which the agent never writes).
    owned: pool.Owned = args.public_pool
    default = NatNodeConfig.port_range
    node = NatNode(NatNodeConfig(name=args.netns, inside_if=args.inside_if,
                                 pool=tuple(pool.PublicRange(a, p) for a in args.public_address for p in owned.ports.get(a, (default,)))))
    # Measured: with the kernel default nf_conntrack_events=2 ("auto"), an entry
    # created while nobody listened never reports its DESTROY, so a controller
    # subscribing after the copy would miss sessions closed during the move.
    # 1 makes every entry report; the sysctl is per namespace (the node's own).
    netns.sysctl(args.netns, "net.netfilter.nf_conntrack_events", 1)
    if not node.admission():
        # Admission was left closed (an agent killed mid-migration with no
        # state directory to undo it, or an operator): closing it again makes
        # this process hold the packets the kernel would otherwise drop.
        log.warning("NAT node %s: admission is closed; holding new sessions until it opens", args.netns)
        node.set_admission(False)
    # Ports given (A:LOW-HIGH) are checked: a session outside them is one this node's SNAT would never make.
    provider = ConntrackProvider(args.netns, public_addresses=owned, node=node)
    # The first statistics() reads the table whole and starts following its
    # events (ctdigest); made here, the one a migration asks for inside its
    # hold window costs only what changed since (10k: ~20 ms, 100k: ~45 ms,
    # against a full read's ~0.1 s and ~1 s).
    try:
        provider.statistics()
    except NatmigError as e:
        log.warning("NAT node %s: nat-statistics not followed yet (the first <get> reads the table): %s", args.netns, e)
    return provider


#: --provider NAME -> how to build it from the arguments.
PROVIDERS: dict[str, Callable[[argparse.Namespace], SessionProvider]] = {
    "memory": _memory,
    "conntrack": _conntrack,
}


def _firewall(args: argparse.Namespace, cfg: AgentConfig) -> Agent:
    """The agent of a firewall node: fw-state over the namespace's conntrack table and blocked set."""
    from ..schema import YANG_DIR
    from ..statemodel import load_module
    from .fwnode import FwNode, FwNodeConfig
    from .fwprovider import FirewallProvider
    from .stateagent import StateAgent

    if not args.netns:
        raise AgentError("--provider firewall needs --netns (the firewall node's namespace)")
    node = FwNode(FwNodeConfig(name=args.netns, inside_if=args.inside_if, outside_if=args.outside_if))
    netns.sysctl(args.netns, "net.netfilter.nf_conntrack_events", 1)  # every entry reports its end (see fwnode.sysctls)
    if not node.admission():
        log.warning("firewall node %s: admission is closed; holding new connections until it opens", args.netns)
        node.set_admission(False)
    module = load_module(YANG_DIR / "fw-state.yang")
    return StateAgent(cfg, module, FirewallProvider(module, node))


def _chain(args: argparse.Namespace, cfg: AgentConfig) -> Agent:
    """The agent of a chained node (firewall then NAT, one conntrack table): fw-state and nat-session over one provider."""
    from ..schema import YANG_DIR
    from ..statemodel import load_module
    from .chainprovider import ChainProvider
    from .fwnode import FwNode, FwNodeConfig
    from .stateagent import StateAgent

    if not args.netns:
        raise AgentError("--provider chain needs --netns (the chained node's namespace)")
    node = FwNode(FwNodeConfig(name=args.netns, inside_if=args.inside_if, outside_if=args.outside_if))
    netns.sysctl(args.netns, "net.netfilter.nf_conntrack_events", 1)
    if not node.admission():
        log.warning("chained node %s: admission is closed; holding new connections until it opens", args.netns)
        node.set_admission(False)
    fw, nat = load_module(YANG_DIR / "fw-state.yang"), load_module(YANG_DIR / "nat-session.yang")
    # One store over both modules: a commit hands the provider both lists' changes at once.
    return StateAgent(cfg, [fw, nat], ChainProvider(fw, nat, node))


def _agent(args: argparse.Namespace, cfg: AgentConfig) -> Agent:
    """The NAT agent over its provider, or, with --module, the agent of that state module."""
    if args.provider == "firewall":
        return _firewall(args, cfg)
    if args.provider == "chain":
        return _chain(args, cfg)
    if args.module is None:
        return Agent(cfg, PROVIDERS[args.provider](args), default_codec())
    if args.provider != "memory":
        # Only natmig's own providers know a network function's kernel state.
        raise AgentError(f"--module serves a state module from memory: it needs --provider memory, not {args.provider}")
    from ..statemodel import load_module
    from .stateagent import StateAgent

    module = load_module(args.module)
    log.info("serving module %s@%s from memory: %s", module.name, module.revision, ", ".join(l.qname for l in module.lists))
    return StateAgent(cfg, module)


def run_agent(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    args = agent_config.resolve(args, args.agent_options)
    args.public_pool = public_pool(args.public_address)
    args.public_address = public_addresses(args.public_address)
    if args.listen is None:
        raise AgentError("--listen ADDR[:PORT] is required: the node's management address (the agent never picks one itself)")
    notifier = Notifier()  # before entering the namespace (see agent/service.py)
    pidfile = PidFile(args.pidfile)
    if args.netns:
        netns.enter(args.netns)
    limit_malloc_arenas()
    host, port = args.listen
    if args.listen_anyway:
        log.warning("--listen-anyway: listening on %s without checking the NAT's public and inside addresses", host)
    else:
        check_listen(host, args.public_address or MEMORY_PUBLIC, args.inside_if)
    cfg = AgentConfig(
        host=host, port=port, host_key=args.host_key, passwords=args.passwords,
        authorized_keys=args.authorized_keys, max_message=args.max_message,
        max_sessions=args.max_sessions, idle_timeout=args.idle_timeout, state_dir=args.state_dir, nacm=args.nacm,
        max_elements=args.max_elements, notify_backlog=args.notify_backlog,
    )
    agent = _agent(args, cfg)

    async def main() -> None:
        stop = asyncio.Event()
        # SIGTERM (how test fixtures and the demo stop an agent) closes sessions and the event watch.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await agent.start()
        homes = [asyncio.ensure_future(call_home(agent, t, stop)) for t in args.call_home or []]
        if args.ready_file:
            # Tests and scripts wait for this file instead of polling the port.
            with open(args.ready_file, "w") as f:
                f.write(f"{os.getpid()} {agent.port}\n")
        where = f"listening on {host}:{agent.port}" + (f" in netns {args.netns}" if args.netns else "")
        print(f"natmig agent: {where}", file=sys.stderr, flush=True)
        pidfile.write()
        notifier.notify("READY=1", f"STATUS={where}", f"MAINPID={os.getpid()}")
        try:
            await stop.wait()
        finally:
            notifier.notify("STOPPING=1")
            for h in homes:
                h.cancel()
            agent.close()
            pidfile.remove()
            log.info("agent stopped")

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    """Create the host key (unless it exists) and print the known_hosts line the controller needs."""
    args = agent_config.resolve(args, args.agent_options)
    key, created = keygen(args.host_key)
    # --listen has no default (the agent never picks its address): without it the line needs --address.
    host, port = args.listen or ("", 830)
    if args.address:
        text = args.address
        with_port = "]:" in text if text.startswith("[") else text.count(":") == 1
        host = parse_listen(text)[0]
        if with_port:
            port = parse_listen(text)[1]
    if host in ("0.0.0.0", "::", ""):
        host = "ADDRESS"
        print("natmig agent keygen: the agent listens on every address: replace ADDRESS with the one the controller "
              "connects to, or give --address", file=sys.stderr)
    print(known_hosts_line(key, host, port))
    print(f"natmig agent keygen: host key {args.host_key} {'created' if created else 'exists'} ({args.host_key}.pub beside it); "
          "add the line above to the known_hosts file the inventory names", file=sys.stderr)
    return 0


def run_passwd(args: argparse.Namespace) -> int:
    """Add or change a user of a password file."""
    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = getpass.getpass(f"password for {args.user}: ")
        if pw != getpass.getpass("again: "):
            raise AgentError("the passwords differ")
    set_password(args.file, args.user, pw)
    print(f"{args.file}: password of {args.user} set")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `natmig agent` (and `natmig agent passwd`, `natmig agent keygen`)."""
    p = sub.add_parser(
        "agent", help="run the NETCONF agent of a NAT node",
        description="Run the NETCONF agent (SSH, subsystem netconf) of one NAT node: its nat-session data is the "
        "node's live conntrack table. `natmig agent passwd FILE USER` manages the password file.",
    )
    p.add_argument("--listen", type=parse_listen, metavar="ADDR:PORT", help="the management address and port to listen on (required; port 830 "
                   "if omitted); refused on the NAT's public or inside addresses and on 0.0.0.0")
    p.add_argument("--listen-anyway", action="store_true", help="listen on --listen even where the NAT's public or inside side answers")
    p.add_argument("--call-home", action="append", type=_call_home_target, metavar="HOST[:PORT]",
                   help="dial this controller (RFC 8071 call home, port 4334 by default) and keep dialling with a backoff; repeatable")
    p.add_argument("--netns", metavar="NAME", help="network namespace of the NAT node to run in")
    p.add_argument("--provider", choices=sorted([*PROVIDERS, "firewall", "chain"]), default="conntrack",
                   help="where the session table lives (memory: protocol tests and demos; firewall: a firewall node's fw-state; "
                   "chain: a firewall then a NAT in one namespace, fw-state and nat-session over one table)")
    p.add_argument("--module", metavar="FILE.yang", help="serve the state lists of this YANG module from memory, with natmig-state "
                   "(needs --provider memory): an agent of any network function's state, for the migration engine")
    p.add_argument("--public-address", action="append", type=_public_address, metavar="A[-B][:LOW-HIGH]",
                   help="public address of the NAT, or a range FIRST-LAST of its address pool, with the ports it gives out "
                   "or not (repeatable): the translated addresses it owns; with ports, a session translated outside them is refused")
    p.add_argument("--inside-if", default="inside0", metavar="IF", help="the NAT's inside interface, for admission control (default %(default)s)")
    p.add_argument("--outside-if", default="outside0", metavar="IF", help="a firewall's outside interface, for admission control (default %(default)s)")
    p.add_argument("--host-key", default="agent_host_key", metavar="FILE", help="SSH host key, created (ECDSA) if missing")
    p.add_argument("--passwords", metavar="FILE", help="the agent's HASHED password file, USER:scrypt$... lines written by "
                   "`natmig agent passwd` (not the inventory's plaintext password_file)")
    p.add_argument("--authorized-keys", metavar="FILE", help="OpenSSH authorized_keys file")
    p.add_argument("--max-message", type=int, default=AgentConfig.max_message, metavar="BYTES", help="largest accepted message (default %(default)s)")
    p.add_argument("--max-elements", type=int, default=AgentConfig.max_elements, metavar="N", help="XML nodes a message's tree may hold at once (default %(default)s)")
    p.add_argument("--notify-backlog", type=int, default=AgentConfig.notify_backlog, metavar="BYTES", help="notifications queued for a subscriber that does not read before its session is ended (default %(default)s)")
    p.add_argument("--max-sessions", type=int, default=AgentConfig.max_sessions, metavar="N", help="concurrent NETCONF sessions (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=AgentConfig.idle_timeout, metavar="SECONDS", help="close sessions silent this long (default %(default)s)")
    p.add_argument("--nacm", metavar="FILE", help="access control (RFC 8341): users' groups and rule lists, TOML (docs/agent.md); "
                   "without it every authenticated user may read and write")
    p.add_argument("--ready-file", metavar="FILE", help="write 'PID PORT' here once listening")
    p.add_argument("--state-dir", metavar="DIR", help="keep a pending confirmed commit's undo record here, so that a restarted agent "
                   "rolls it back (created mode 0700; best on /run, which a reboot empties along with the kernel's table)")
    p.add_argument("--config", metavar="FILE", help="TOML file with a key per flag (max_sessions = 16); flags given here override it")
    p.add_argument("--pidfile", metavar="FILE", help="write the agent's pid here once listening (removed at exit)")
    p.set_defaults(func=run_agent)
    # Every option above becomes a config key (agent/config.py).
    p.set_defaults(agent_options=agent_config.track_given(p))
    asub = p.add_subparsers(dest="agent_command", metavar="passwd|keygen")
    kg = asub.add_parser("keygen", help="create the agent's SSH host key (--host-key, or the config's) and print its known_hosts line",
                         description="Create the host key named by the agent's --host-key (or its --config file's host_key) "
                         "unless it exists, with FILE.pub beside it, and print the OpenSSH known_hosts line for the controller: "
                         "`natmig agent --config /etc/natmig/agent/nat1.toml keygen >> /etc/natmig/known_hosts`.")
    kg.add_argument("--address", metavar="HOST[:PORT]", help="the address the controller connects to (default: the --listen address and port)")
    # Also accepted after `keygen`; SUPPRESS keeps the agent's own value when they are not given here.
    kg.add_argument("--host-key", default=argparse.SUPPRESS, metavar="FILE", help="the host key file (default: the agent's)")
    kg.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help="the agent's config file, for host_key and listen")
    agent_config.track_given(kg, tag="_keygen")
    kg.set_defaults(func=run_keygen)
    pw = asub.add_parser("passwd", help="add or change a user in a password file")
    pw.add_argument("file", help="password file (created mode 0600)")
    pw.add_argument("user")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    pw.set_defaults(func=run_passwd)
