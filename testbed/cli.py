"""`natmig testbed up | down | status | point-to | list`: the emulated network from the command line."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

from ..errors import TestbedError
from .bed import Testbed
from .prefix import DEFAULT_PREFIX, STATE_ROOT, known_prefixes, leftovers


def _testbed(args: argparse.Namespace) -> Testbed:
    """The testbed named by --prefix: the one already built (its saved topology) unless --topology is given."""
    if args.topology is None and (STATE_ROOT / args.prefix / "state.json").exists():
        return Testbed.attach(args.prefix)
    return Testbed.from_file(args.topology, args.prefix)


def _up(args: argparse.Namespace) -> int:
    tb = Testbed.from_file(args.topology, args.prefix)
    t0 = time.perf_counter()
    built = tb.up()
    took = time.perf_counter() - t0
    if built:
        if tb.topology.multi_machine:
            rundirs = ", ".join(f"{m} {ovs.rundir}" for m, ovs in tb.switches.items())
            print(f"testbed {tb.prefix} up in {took:.2f} s: {len(tb.switches)} machines joined by {tb.topology.underlay.tunnel if tb.topology.underlay else ''} tunnels;"
                  f" traffic through {tb.topology.active_nat}; switch rundirs: {rundirs}")
        else:
            print(f"testbed {tb.prefix} up in {took:.2f} s: traffic through {tb.topology.active_nat}; switch rundir {tb.rundir}")
    else:
        print(f"testbed {tb.prefix} already up (nothing changed)")
    return 0


def _down(args: argparse.Namespace) -> int:
    try:
        tb = _testbed(args)
    except TestbedError:
        # A damaged state file must not keep down from removing the rest.
        tb = Testbed.from_file(None, args.prefix)
    removed = tb.down()
    what = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in removed.items() if v)
    print(f"testbed {tb.prefix} down" + (f" (removed {what})" if what else " (nothing was there)"))
    return 0


def _point_to(args: argparse.Namespace) -> int:
    tb = _testbed(args)
    took = tb.point_to(args.nat)
    how = "one OpenFlow bundle" if not tb.topology.multi_machine else (
        "one bundle per switch: " + (", ".join(f"{stage} {m} {secs * 1000:.1f} ms" for m, stage, secs in tb.last_steps) or "nothing to change"))
    # With several NAT instances only args.nat's moved: read that instance back.
    print(f"testbed {tb.prefix}: traffic now through {tb.active_nat(args.nat)} ({took * 1000:.1f} ms, {how})")
    return 0


def _status(args: argparse.Namespace) -> int:
    tb = _testbed(args)
    st = tb.status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(format_status(st))
    return 0 if st["healthy"] or st["phase"] == "down" else 1


def _list(args: argparse.Namespace) -> int:
    prefixes = known_prefixes()
    for prefix in prefixes:
        left = leftovers(prefix)
        state = STATE_ROOT / prefix / "state.json"
        phase = json.loads(state.read_text()).get("phase", "?") if state.exists() else "no state"
        print(f"{prefix:<12} {phase:<9} {len(left['namespaces'])} namespaces, {len(left['processes'])} OVS daemons")
    if not prefixes:
        print("no testbed here")
    return 0


def format_status(st: dict[str, Any]) -> str:
    """A human-readable status report of :meth:`Testbed.status`."""
    lines = [
        f"testbed {st['prefix']} ({st['topology']}): {st['phase']}{'' if st['healthy'] or st['phase'] == 'down' else ' (DAMAGED: run up again or down)'}",
        f"  traffic through: {st['active_nat'] or '-'}   public address: {st['public_address']}",
        "  nodes:",
    ]
    for name, n in st["nodes"].items():
        addrs = "  ".join(f"{ifname} {','.join(a)}" for ifname, a in n["addresses"].items()) or ("(no namespace)" if not n["exists"] else "-")
        lines.append(f"    {name:<10} {n['kind']:<4} {n['netns']:<20} {addrs}")
    if "machines" in st:
        u = st["underlay"]
        lines.append(f"  underlay: {u['subnet']} in {u['netns']}{'' if u['exists'] else ' (missing)'}, {u['tunnel']} tunnels")
        for m, sw in st["machines"].items():
            lines += _switch_lines(f"machine {m} ({sw['underlay']}: {', '.join(sw['nodes'])})", sw)
    else:
        lines += _switch_lines("switch", st["switch"])
    m = st["management"]
    lines.append(f"  management: {m['subnet']} in {m['netns']}{'' if m['exists'] else ' (missing)'}, controller {m['controller']}")
    return "\n".join(lines)


def _switch_lines(title: str, sw: dict[str, Any]) -> list[str]:
    daemons = ", ".join(f"{d} pid {p}" for d, p in sw["daemons"].items()) or "not running"
    lines = [f"  {title}: bridge {sw['bridge']} in {sw['netns']}, {daemons}; OVS_RUNDIR={sw['rundir']}"]
    for port, p in sw["ports"].items():
        if isinstance(p, dict):
            lines.append(f"    {port:<10} ofport {p.get('ofport')}  rx {p.get('rx_packets', '-')} pkts  tx {p.get('tx_packets', '-')} pkts")
        else:
            lines.append(f"    {port}: {p}")
    return lines


_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "up": (_up, "build the network (idempotent)"),
    "down": (_down, "remove everything of the prefix, leftovers of crashed runs included"),
    "status": (_status, "show nodes, addresses, switch ports and the NAT the flows point at"),
    "point-to": (_point_to, "move all traffic to a NAT node in one OpenFlow bundle"),
    "list": (_list, "list the prefixes of testbeds (and leftovers) on this machine"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``natmig testbed`` and its subcommands."""
    p = subparsers.add_parser("testbed", help="the emulated network: namespaces and a private Open vSwitch")
    sub = p.add_subparsers(dest="testbed_command", metavar="ACTION", required=True)
    for name, (func, help_text) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(func=func)
        if name == "list":
            continue
        sp.add_argument("--topology", metavar="FILE", help="topology file (TOML); default: the demo topology, or the one the testbed was built from")
        sp.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"run prefix of namespace names (default {DEFAULT_PREFIX})")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print the status as JSON")
        if name == "point-to":
            sp.add_argument("nat", help="NAT node to send the traffic through")
