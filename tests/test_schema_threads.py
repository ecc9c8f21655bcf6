"""The module compiles once and safely when several threads ask for it first (a controller's parallel RPCs do)."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter: nothing compiled or cached yet.  pyang's pattern
# checker sets up class-level lxml documents on first use without a guard; the
# window is widened here so that an unserialised compile fails every time.
SCRIPT = """
import sys, threading, time
import lxml.etree
from pyang import types
from natmig import codec, schema

orig = types.XSDPattern._prepare_documents.__func__
def slow(cls):
    if cls._schema is None:
        cls._schema = lxml.etree.fromstring(cls.SCHEMA)
        time.sleep(0.05)
        cls._avalue = lxml.etree.fromstring(cls.AVALUE)
        cls._pattern = cls._schema[0][0][0][0]
types.XSDPattern._prepare_documents = classmethod(slow)

fn = {"raw": schema._load_schema, "load_schema": schema.load_schema, "default_codec": codec.default_codec}[sys.argv[1]]
errors = []
start = threading.Barrier(6)
def first_use():
    start.wait()
    try:
        fn()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first_use) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors))
"""


def run(entry: str) -> int:
    cp = subprocess.run([sys.executable, "-c", SCRIPT, entry], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return int(cp.stdout.strip())


def test_unserialised_first_compiles_do_collide_so_this_test_can_fail():
    assert run("raw") > 0


def test_load_schema_and_default_codec_compile_once_from_many_threads():
    assert run("load_schema") == 0
    assert run("default_codec") == 0
