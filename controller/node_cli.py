"""`natmig node NAME status | sessions | admission | load | flush`: one NAT node by hand, over NETCONF.

The node is named in the inventory (``--inventory``, or ``$NATMIG_INVENTORY``)
and reached as a migration reaches it: host key checked, from the agent's
``netns`` when the inventory names one.  The work is in :mod:`.node`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from ..codec import default_codec
from ..codec_cli import read_document
from ..errors import EXIT_OK, UsageError
from . import node as ops
from .inventory import load
from .migrate import endpoint_from_spec


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Any]:
    """A NETCONF session to the node the command names (closed on the way out)."""
    path = args.inventory or os.environ.get("NATMIG_INVENTORY")
    if not path:
        raise UsageError("name the inventory: --inventory FILE (or NATMIG_INVENTORY)")
    inv = load(path, list(args.set or []))
    client = endpoint_from_spec(inv.agent(args.node, "node")).open()
    try:
        yield client
    finally:
        client.close()


def _status(args: argparse.Namespace) -> int:
    with _session(args) as client:
        st = ops.status(args.node, client)
    print(json.dumps(st.to_dict(), indent=2) if args.json else st.text())
    return EXIT_OK


def _sessions(args: argparse.Namespace) -> int:
    match = ops.parse_filters(args.filter or [])
    with _session(args) as client:
        found = ops.sessions(client, match)
    if args.count:
        print(len(found))
    elif args.json:
        sys.stdout.buffer.write(default_codec().encode_json(found, indent=2) + b"\n")
    else:
        for s in found:
            print(ops.format_session(s))
        # As conntrack -L does: the count on stderr, so that stdout stays one session a line.
        print(f"natmig node {args.node}: {len(found)} session(s) shown", file=sys.stderr)
    return EXIT_OK


def _admission(args: argparse.Namespace) -> int:
    with _session(args) as client:
        admits = ops.set_admission(client, args.state == "open")
    print(f"node {args.node}: admission {'open (admits new sessions)' if admits else 'CLOSED (new sessions are held)'} (read back)")
    return EXIT_OK


def _load(args: argparse.Namespace) -> int:
    table = read_document(args.file, args.format)  # refused whole before any session is opened
    with _session(args) as client:
        now = ops.load(client, table, replace=args.replace)
    print(f"node {args.node}: {len(table)} session(s) {'written as the whole table' if args.replace else 'merged'}; it holds {now} (read back)")
    return EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    with _session(args) as client:
        before, after = ops.flush(client)
    print(f"node {args.node}: {before} session(s) removed; it holds {after} (read back)")
    return EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inventory", "-i", metavar="FILE", help="agents (TOML or YAML; default $NATMIG_INVENTORY)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override an inventory field, e.g. agents.nat2.host=192.0.2.12 (repeatable)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `natmig node NAME ACTION`."""
    p = sub.add_parser("node", help="one NAT node by hand: status, sessions, admission, load, flush",
                       description="Look at or change one NAT node over NETCONF, as named in the inventory. Every "
                       "change is read back from the node; a node locked by a migration refuses, naming the holder.")
    p.add_argument("node", metavar="NAME", help="the node's name in the inventory ([agents.NAME])")
    acts = p.add_subparsers(dest="node_command", metavar="ACTION", required=True)

    a = acts.add_parser("status", help="module revision, session counts, digest, admission, locks and their holders")
    a.add_argument("--json", action="store_true", help="print the status as JSON")
    a.set_defaults(func=_status)

    a = acts.add_parser("sessions", help="list the node's sessions (one a line, or RFC 7951 JSON)")
    a.add_argument("--filter", action="append", metavar="LEAF=VALUE", help="only sessions whose leaf has this value, e.g. protocol=TCP, dst_port=80 (repeatable: all must match)")
    a.add_argument("--json", action="store_true", help="RFC 7951 JSON, as `natmig node NAME load` reads it")
    a.add_argument("--count", action="store_true", help="print only how many")
    a.set_defaults(func=_sessions)

    a = acts.add_parser("admission", help="open or close the node's admission of new sessions")
    a.add_argument("state", choices=("open", "close"))
    a.set_defaults(func=_admission)

    a = acts.add_parser("load", help="write a nat-session document (XML or JSON) into the node, all or nothing")
    a.add_argument("file", help="document path, or - for standard input")
    a.add_argument("--format", choices=["xml", "json"], help="input format (default: guessed)")
    a.add_argument("--replace", action="store_true", help="the node then holds exactly the document (default: merge)")
    a.set_defaults(func=_load)

    a = acts.add_parser("flush", help="remove every session of the node")
    a.set_defaults(func=_flush)

    for child in acts.choices.values():
        _common(child)
        # Errors start "natmig node: error:" (the prog would read "natmig node NAME load").
        child.set_defaults(command_name="natmig node")
