"""`natmig migrate`, `natmig drain` and `natmig demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, outcome_exit
from .inventory import Inventory, load
from .migrate import MigrateOptions, Migration, endpoint_from_spec
from .recover import recover
from .report import PhaseTiming, format_report, ms
from .steering import steering_from_spec

if TYPE_CHECKING:
    from .drain import MoveResult


def _migration_inventory(args: argparse.Namespace, command: str) -> Inventory | None:
    """The inventory with --from/--to/--set applied; None (the error printed) when it names no source, target or switch."""
    if not args.inventory:
        args.inventory = os.environ.get("NATMIG_INVENTORY")
    if not args.inventory and not args.set:
        raise UsageError("name the inventory: --inventory FILE (or NATMIG_INVENTORY)")
    overrides = list(args.set or [])
    if args.source:
        overrides.append(f"migration.source={args.source}")
    if args.target:
        overrides.append(f"migration.target={args.target}")
    inv = load(args.inventory, overrides)
    if inv.source is None or inv.target is None:
        print(f"natmig {command}: error: name the source and target (--from/--to or [migration] in the inventory)", file=sys.stderr)
        return None
    if inv.switch is None and getattr(args, "controller", None) is None:
        print(f"natmig {command}: error: the inventory has no [switch] section", file=sys.stderr)
        return None
    return inv


def run_migrate(args: argparse.Namespace) -> int:
    """Move a network function's live state from a source agent to a target agent, then repoint traffic.

    The generic engine runs by default: it moves the state lists of whatever modules both agents announce.  An inventory
    with [migration] engine = "nat" runs the NAT's own migration instead."""
    _check_json_path(args.json)
    inv = _migration_inventory(args, "migrate")
    if inv is None:
        return EXIT_USAGE
    assert inv.source is not None and inv.target is not None
    if args.controller is not None:
        return _run_via_controller(args, inv)
    assert inv.switch is not None
    if inv.engine == "generic":
        return _run_state_migration(args, inv)
    src = endpoint_from_spec(inv.agent(inv.source, "source"))
    dst = endpoint_from_spec(inv.agent(inv.target, "target"))
    opts = MigrateOptions(copy_state=not args.no_state, retire=args.retire or inv.retire, settle=args.settle / 1000, verify_source=args.verify_source,
                          confirm_timeout=args.confirm_timeout,
                          recover_hint=f"natmig recover --inventory {args.inventory} --from {inv.source} --to {inv.target}")

    def progress(ph: PhaseTiming) -> None:
        if not args.quiet:
            print(f"{ph.name:<10} {ms(ph.seconds):>10}  {'ok' if ph.ok else 'FAILED'}", file=sys.stderr, flush=True)

    report = Migration(src, dst, steering_from_spec(inv.switch, inv.source), opts, progress).run()
    # With --json - standard output carries the JSON alone; the text goes to stderr.
    print(format_report(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, report.to_json())
    if report.outcome != "ok":
        print(f"natmig migrate: failed in phase {report.failed_phase}: {report.error}; traffic on {report.traffic_on}; "
              + "; ".join(f"{n}: {s}" for n, s in report.node_state.items()), file=sys.stderr)
    return outcome_exit(report.outcome, "read back: traffic on the source, both nodes admit new sessions, the target holds what it held",
                        f"run `{opts.recover_hint}`", _to_stderr)

def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _run_state_migration(args: argparse.Namespace, inv: Inventory) -> int:
    """The generic engine (the default; the only one with switch = "none"): moves whatever state modules the two agents
    serve, and with a switch the traffic."""
    from .engine import EngineMigration, EngineOptions, default_phases, switch_only_phases
    from .statenode import StateNode

    assert inv.source is not None and inv.target is not None and inv.switch is not None
    retire = args.retire or inv.retire
    nat_only = [what for what, given in (("--retire stop", retire == "stop"), ("--verify-source read", args.verify_source != "digest"))
                if given]
    if nat_only:
        print(f"natmig migrate: error: {' and '.join(nat_only)} belong to the NAT's own migration: "
              'set [migration] engine = "nat" in the inventory (or --set migration.engine=nat)', file=sys.stderr)
        return EXIT_USAGE
    steering = None if inv.switch.kind == "none" else steering_from_spec(inv.switch, inv.source)
    if args.no_state and steering is None:
        print('natmig migrate: error: --no-state moves traffic only, and this inventory\'s switch is "none"', file=sys.stderr)
        return EXIT_USAGE
    opts = EngineOptions(retire="delete" if args.no_state else retire, confirm_timeout=args.confirm_timeout,
                         recover_hint=f"natmig recover --inventory {args.inventory} --from {inv.source} --to {inv.target}")

    def opener(role: str, name: str) -> Callable[[], StateNode]:
        endpoint = endpoint_from_spec(inv.agent(name, role))
        return lambda: StateNode(endpoint.open())  # type: ignore[arg-type]

    def progress(ph: PhaseTiming) -> None:
        if not args.quiet:
            print(f"{ph.name:<10} {ms(ph.seconds):>10}  {'ok' if ph.ok else 'FAILED'}", file=sys.stderr, flush=True)

    # --no-state: the negative control, traffic moved and nothing copied (live flows break).
    phases = switch_only_phases(steering) if args.no_state and steering is not None else default_phases(steering, args.settle / 1000)
    report = EngineMigration(opener("source", inv.source), opener("target", inv.target), inv.source, inv.target, opts,
                             phases, on_phase=progress, source_events=opener("source", inv.source)).run()
    print(report.text(), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, report.to_json())
    if not report.ok:
        where = f"; traffic on {report.traffic_on} (read back from the switch)" if report.traffic_on else ""
        print(f"natmig migrate: failed in phase {report.failed_phase}: {report.error}{where}", file=sys.stderr)
    return outcome_exit(report.outcome, "read back: the source admits new entries, the target's copy was undone",
                        f"the agents roll back what this migration left pending within {opts.confirm_timeout:g} s by themselves "
                        "(persistent confirmed commits); then read both with `natmig node NAME status`", _to_stderr)

def _run_via_controller(args: argparse.Namespace, inv: Inventory) -> int:
    """The migration asked of a controller service (its northbound), which runs it on the agents' registered sessions."""
    from .servicecli import migrate_via

    return migrate_via(args, inv)


def run_drain(args: argparse.Namespace) -> int:
    """Move every NAT instance on one machine to its twin on another (the agent serving the same networks), N at a time, each as its own migration."""
    from .drain import Drain, DrainOptions, pair_moves

    _check_json_path(args.json)
    if args.parallel < 1:
        raise UsageError(f"--parallel {args.parallel}: at least 1 move at a time")
    if not args.inventory:
        args.inventory = os.environ.get("NATMIG_INVENTORY")
    if not args.inventory:
        raise UsageError("name the inventory: --inventory FILE (or NATMIG_INVENTORY)")
    inv = load(args.inventory, list(args.set or []))
    if inv.switch is None or inv.switch.kind == "none":
        raise UsageError(f"{args.inventory}: a drain moves traffic: the inventory needs a [switch] (an Open vSwitch bridge or a testbed)")
    moves = pair_moves(inv, args.host, args.to)
    opts = MigrateOptions(retire=args.retire or inv.retire, confirm_timeout=args.confirm_timeout)
    hint = f"natmig recover --inventory {args.inventory} --from {{source}} --to {{target}}"
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"draining machine {args.host} to {args.to}: {len(moves)} NAT instance(s), {args.parallel} at a time: "
          + ", ".join(f"{m.source} -> {m.target}" for m in moves), file=out, flush=True)

    def done(r: "MoveResult") -> None:
        if not args.quiet:
            print(f"  {r.move.source} -> {r.move.target}: {'ok' if r.ok else 'FAILED'} ({ms(r.ended - r.started)})", file=out, flush=True)

    switch = inv.switch
    report = Drain(moves, lambda name: endpoint_from_spec(inv.agent(name, "agent")), lambda src: steering_from_spec(switch, src),
                   DrainOptions(args.parallel, opts, hint), on_done=done).run(args.host, args.to)
    print(report.text(), file=out)
    if args.json:
        _write_json(args.json, report.to_json())
    if report.ok:
        return EXIT_OK
    # As for one migration: 1 when every failed move was read back unchanged (rolled back), 3 when one needs recover.
    return EXIT_ATTENTION if report.attention else EXIT_FAILED


def run_controller(args: argparse.Namespace) -> int:
    """Run the controller service: agents call home to it, NETCONF clients ask it for migrations."""
    from .service import run

    return run(args.config, args.ready_file)


def run_recover(args: argparse.Namespace) -> int:
    """Read both nodes and the switch, then finish or undo an interrupted migration (see docs/controller.md)."""
    _check_json_path(args.json)
    inv = _migration_inventory(args, "recover")
    if inv is None:
        return EXIT_USAGE
    assert inv.source is not None and inv.target is not None and inv.switch is not None
    report = recover(endpoint_from_spec(inv.agent(inv.source, "source")), endpoint_from_spec(inv.agent(inv.target, "target")),
                     steering_from_spec(inv.switch, inv.source), args.retire or inv.retire)
    print(report.text(), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, report.to_json())
    if report.ok:
        return EXIT_OK
    # A recovery that did not end consistent leaves the state for the operator.
    print("natmig recover: the state needs attention (see above); run recover again once the cause is fixed", file=sys.stderr)
    return EXIT_ATTENTION


def _check_json_path(path: str | None) -> None:
    """Refuse a --json path that cannot be written before anything runs, not after a migration."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir():
        raise UsageError(f"--json {path}: cannot write: {'is a directory' if p.is_dir() else 'no such directory ' + str(p.parent)}")


def _write_json(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    try:
        Path(path).write_text(text + "\n")
    except OSError as e:
        raise UsageError(f"--json {path}: cannot write: {e.strerror or e}") from e


def run_demo(args: argparse.Namespace) -> int:
    """The four-step demo with live traffic on the embedded testbed."""
    from . import demo, demoservice

    if args.nf == "firewall":
        # The firewall's demo moves fw-state with the generic engine: its report has no NAT phases to draw or stop.
        for given, flag in ((args.plot, "--plot"), (args.churn, "--churn"), (args.retire == "stop", "--retire stop"),
                            (args.via_controller, "--via-controller")):
            if given:
                raise UsageError(f"{flag}: the NAT demo's alone; not with --nf firewall")
    if args.via_controller and (args.no_state or args.retire == "stop"):
        raise UsageError("--via-controller: the controller service's engine moves state: --no-state and --retire stop do not apply")
    return (demoservice.run if args.via_controller else demo.run)(demo.DemoOptions(
        sessions=args.sessions, tcp=args.tcp, udp=args.udp, interval=args.interval / 1000, churn=args.churn,
        no_state=args.no_state, json_path=args.json, plot_path=args.plot, prefix=args.prefix, topology=args.topology,
        after=args.after, retire=args.retire, nf=args.nf,
    ))


def run_plot(args: argparse.Namespace) -> int:
    """Draw a saved demo report (natmig demo --json): each flow's gaps over time, the phases as bands."""
    from .plot import load_report, plot

    plot(load_report(args.report), args.output)
    print(f"{args.output}: drawn from {args.report}")
    return 0


def _inventory_arguments(p: argparse.ArgumentParser, source: str, target: str) -> None:
    """The arguments :func:`_migration_inventory` reads: --inventory, --from, --to, --set."""
    p.add_argument("--inventory", "-i", metavar="FILE", help="agents and switch (TOML or YAML; see docs/controller.md; default $NATMIG_INVENTORY)")
    p.add_argument("--from", dest="source", metavar="NAT", help=f"{source} (overrides migration.source)")
    p.add_argument("--to", dest="target", metavar="NAT", help=f"{target} (overrides migration.target)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override an inventory field, e.g. agents.nat2.host=192.0.2.12 (repeatable)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `natmig migrate` and `natmig demo`."""
    m = sub.add_parser("migrate", help="move a network function's live state to another node, then repoint traffic",
                       description=run_migrate.__doc__)
    _inventory_arguments(m, "source agent", "target agent")
    m.add_argument("--retire", choices=("delete", "keep", "stop"),
                   help="what becomes of the source (default: inventory, else delete; stop: the NAT engine's only)")
    m.add_argument("--no-state", action="store_true", help="do not copy state (negative control: live flows break)")
    m.add_argument("--settle", type=float, default=10.0, metavar="MS", help="quiet time of the source's events before the switch (default 10)")
    m.add_argument("--verify-source", choices=("digest", "read"), default="digest",
                   help="the NAT engine's: how verify knows the frozen source's table: its nat-statistics digest against the snapshot and events (default; re-read when they differ) or always re-read it")
    m.add_argument("--confirm-timeout", type=float, default=MigrateOptions.confirm_timeout, metavar="S",
                   help="seconds after which the agents undo by themselves what an interrupted migration left pending (default %(default)g)")
    m.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': standard output)")
    m.add_argument("--controller", nargs="?", const="", metavar="HOST[:PORT]",
                   help="ask the controller service of the inventory's [controller] (at HOST[:PORT] when given) to run the migration")
    m.set_defaults(func=run_migrate)

    dr = sub.add_parser("drain", help="move every NAT instance on one machine to its twin on another, N at a time",
                        description=run_drain.__doc__)
    dr.add_argument("--inventory", "-i", metavar="FILE", help="agents (each with its machine and networks) and switch (default $NATMIG_INVENTORY)")
    dr.add_argument("--host", required=True, metavar="MACHINE", help="the machine to drain (agents.NAME.machine)")
    dr.add_argument("--to", required=True, metavar="MACHINE", help="the machine whose NAT nodes take over (each the twin serving the same networks)")
    dr.add_argument("--parallel", type=int, default=1, metavar="N", help="moves in flight at once (default 1)")
    dr.add_argument("--retire", choices=("delete", "keep", "stop"), help="what becomes of each source (default: inventory, else delete)")
    dr.add_argument("--confirm-timeout", type=float, default=MigrateOptions.confirm_timeout, metavar="S",
                    help="seconds after which the agents undo by themselves what an interrupted move left pending (default %(default)g)")
    dr.add_argument("--set", action="append", metavar="PATH=VALUE", help="override an inventory field, e.g. agents.a1.machine=A (repeatable)")
    dr.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': standard output)")
    dr.set_defaults(func=run_drain)

    c = sub.add_parser("controller", help="run the controller service that agents call home to (RFC 8071)",
                       description=run_controller.__doc__)
    c.add_argument("--config", "-c", required=True, metavar="FILE", help="the controller's TOML file (docs/controller-service.md)")
    c.add_argument("--ready-file", metavar="FILE", help="write 'PID NORTHBOUND-PORT CALL-HOME-PORT' here once listening")
    c.set_defaults(func=run_controller)

    r = sub.add_parser("recover", help="finish or undo an interrupted migration, from what the nodes and the switch say",
                       description=run_recover.__doc__)
    _inventory_arguments(r, "the interrupted migration's source", "its target")
    r.add_argument("--retire", choices=("delete", "keep"), help="when the move happened: remove the source's copies (delete) or keep them (default: inventory)")
    r.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': standard output)")
    r.set_defaults(func=run_recover)

    d = sub.add_parser("demo", help="the four-step live migration demo on the embedded testbed",
                       description=run_demo.__doc__)
    d.add_argument("--nf", choices=("nat", "firewall"), default="nat",
                   help="the network function: two NATs, or two stateful firewalls with an inbound service and an attacker they block (default nat)")
    d.add_argument("--sessions", type=int, default=1000, metavar="K", help="extra sessions loaded into the table to move (default 1000)")
    d.add_argument("--tcp", type=int, default=50, help="live TCP connections (default 50)")
    d.add_argument("--udp", type=int, default=50, help="live UDP flows (default 50)")
    d.add_argument("--interval", type=float, default=10.0, metavar="MS", help="each flow sends one message every MS (default 10)")
    d.add_argument("--churn", type=float, default=0.0, metavar="N", help="new TCP connections per second during the run (default 0)")
    d.add_argument("--no-state", action="store_true", help="skip the copy: the negative control, flows must break (firewall: and the attacker is free)")
    d.add_argument("--retire", choices=("delete", "keep", "stop"), default="delete", help="what becomes of nat1 (default delete)")
    d.add_argument("--after", type=float, default=1.5, metavar="S", help="seconds of traffic after the move (default 1.5)")
    d.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': standard output)")
    d.add_argument("--plot", metavar="FILE.png", help="draw each flow's gaps over time with the phases as bands (needs matplotlib)")
    d.add_argument("--prefix", help="testbed name prefix (default: unique per run)")
    d.add_argument("--topology", metavar="FILE", help="testbed topology (default: the demo topology; with --nf firewall, testbed/topologies/firewall.toml)")
    d.add_argument("--via-controller", action="store_true",
                   help="agents call home to a controller service; the move is asked of its NETCONF northbound (netconf-console2)")
    d.set_defaults(func=run_demo)

    pl = sub.add_parser("plot", help="draw a saved demo report: each flow's gaps over time, the phases as bands",
                        description=run_plot.__doc__)
    pl.add_argument("report", help="a report written by natmig demo --json")
    pl.add_argument("--output", "-o", required=True, metavar="FILE.png", help="the picture (its suffix chooses the format)")
    pl.set_defaults(func=run_plot)
