"""`natmig validate` and `natmig convert`: the codec from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .codec import decode_json, decode_xml, encode_json, encode_xml
from .errors import UsageError
from .model import NatSession


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from e


def read_document(path: str, fmt: str | None = None) -> list[NatSession]:
    """The sessions of a nat-session document (XML or RFC 7951 JSON, guessed when ``fmt`` is None; ``-``: stdin).

    All or nothing: a refused document raises CodecError naming every problem.
    """
    data = _read(path)
    if fmt is None:
        fmt = "json" if data.lstrip()[:1] in (b"{", b"[") else "xml"
    return decode_json(data) if fmt == "json" else decode_xml(data)


def _validate(args: argparse.Namespace) -> int:
    sessions = read_document(args.file, args.format)
    print(f"{args.file}: {len(sessions)} valid nat-session entries")
    return 0


def _convert(args: argparse.Namespace) -> int:
    sessions = read_document(args.file, args.format)
    out = encode_json(sessions, indent=2) if args.to == "json" else encode_xml(sessions)
    sys.stdout.buffer.write(out + b"\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the codec subcommands."""
    p = sub.add_parser("validate", help="validate a nat-session document (XML or RFC 7951 JSON)")
    p.add_argument("file", help="document path, or - for standard input")
    p.add_argument("--format", choices=["xml", "json"], help="input format (default: guessed)")
    p.set_defaults(func=_validate)
    p = sub.add_parser("convert", help="convert a nat-session document between XML and JSON")
    p.add_argument("file", help="document path, or - for standard input")
    p.add_argument("--format", choices=["xml", "json"], help="input format (default: guessed)")
    p.add_argument("--to", choices=["xml", "json"], required=True)
    p.set_defaults(func=_convert)
