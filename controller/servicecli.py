"""`natmig migrate --controller`: a migration asked of a controller service through its NETCONF northbound."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from .. import netns
from ..errors import ControllerError, outcome_exit
from .inventory import Inventory
from .netconf import NodeClient
from .northbound import NS


#: How long `natmig migrate --controller` waits for the migrate RPC's reply, in seconds.
MIGRATE_REPLY_TIMEOUT = 3600.0


def migrate_via(args: argparse.Namespace, inv: Inventory) -> int:
    """Connect to the controller named by the inventory, call its migrate RPC, print the report it returns."""
    spec = inv.controller
    if spec is None:
        raise ControllerError(f"{inv.path}: --controller needs a [controller] table (host, credentials, known_hosts) in the inventory")
    host, port = spec.host, spec.port
    if args.controller:
        h, _, p = args.controller.rpartition(":") if args.controller.count(":") == 1 else (args.controller, "", "")
        host, port = h or args.controller, int(p) if p.isdigit() else port

    def connect() -> NodeClient:
        return NodeClient.connect(host, port, spec.username, password=spec.secret(), key_filename=spec.key,
                                  known_hosts=spec.known_hosts, timeout=120)

    client = netns.call_in(spec.netns, connect) if spec.netns else connect()
    body = (f'<migrate xmlns="{NS}"><source>{escape(str(inv.source))}</source><target>{escape(str(inv.target))}</target>'
            f"<retire>{escape(args.retire or inv.retire)}</retire><confirm-timeout>{int(args.confirm_timeout)}</confirm-timeout></migrate>")
    # The reply comes when the migration has ended: at 100,000 sessions on a loaded machine that took
    # minutes.  Waiting is safe for the agents: what the migration leaves pending undoes itself.
    client.reply_timeout = MIGRATE_REPLY_TIMEOUT
    with client:
        reply = client.call("migrate", body)
    n = f"{{{NS}}}"
    ok = reply.findtext(n + "ok") == "true"
    # A controller that predates the outcome leaf: a failure is taken as needing attention.
    outcome = reply.findtext(n + "outcome") or ("ok" if ok else "attention")
    out = {"ok": ok, "outcome": outcome, "failed_phase": reply.findtext(n + "failed-phase"), "error": reply.findtext(n + "error"),
           "report": reply.findtext(n + "report") or "", "controller": f"{host}:{port}"}
    # With --json - standard output carries the JSON alone (docs/cli.md).
    print(out["report"], file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text)
    return outcome_exit(outcome, "the controller read both agents back as they were",
                        "the agents roll back what this migration left pending by themselves (persistent confirmed commits); "
                        "the controller's recover RPC cancels it at once", lambda line: print(line, file=sys.stderr))
