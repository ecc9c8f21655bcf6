"""Bad invocations of `natmig`, run as a user would: each exits with its documented status, none prints a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from natmig.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, EXIT_USAGE

SESSION_JSON = {
    "nat-session:nat-session": [{
        "protocol": "TCP", "src_address": "10.0.0.1", "src_port": 2526, "dst_address": "203.0.113.100", "dst_port": 80,
        "translated_address": "203.0.113.79", "translated_port": 5678,
    }]
}


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inventory(tmp: Path, host: str = "127.0.0.1", port: int | None = None, extra: str = "", netns: str | None = None) -> Path:
    (tmp / "secret").write_text("secret\n")
    port = port or _closed_port()
    ns = f'netns = "{netns}"\n' if netns else ""
    agents = "".join(
        f'[agents.{n}]\nhost = "{host}"\nport = {port}\npassword_file = "{tmp / "secret"}"\nknown_hosts = "{tmp / "known_hosts"}"\n{ns}\n'
        for n in ("nat1", "nat2"))
    switch = ('[switch]\nbridge = "br0"\nclient_port = 1\nserver_port = 2\n'
              "[switch.nats.nat1]\ninside = 3\noutside = 4\n[switch.nats.nat2]\ninside = 5\noutside = 6\n")
    (tmp / "known_hosts").write_text("")
    p = tmp / "inv.toml"
    p.write_text(agents + switch + '[migration]\nsource = "nat1"\ntarget = "nat2"\n' + extra)
    return p


def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATMIG_INVENTORY"}  # the cases name their inventory
    return subprocess.run([sys.executable, "-m", "natmig.cli", *argv], input=stdin, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bad.toml").write_text("[agents.nat1\nhost = 1\n")
    (tmp_path / "port.toml").write_text('[agents.nat1]\nhost = "127.0.0.1"\nport = "x"\npassword = "p"\n')
    (tmp_path / "doc.json").write_text(json.dumps(SESSION_JSON))
    bad = json.loads(json.dumps(SESSION_JSON))
    bad["nat-session:nat-session"][0]["translated_port"] = 70000
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "plain").write_text("secret\n")
    (tmp_path / "agent.toml").write_text('provider = "memory"\nlisten = "127.0.0.1:0"\nno_such_key = 1\n')
    (tmp_path / "agent-type.toml").write_text('provider = "memory"\nmax_sessions = "many"\n')
    return {"dir": str(tmp_path), "inv": str(_inventory(tmp_path)), **{k.replace(".", "_").replace("-", "_"): str(tmp_path / k) for k in
            ("bad.toml", "port.toml", "doc.json", "bad.json", "plain", "agent.toml", "agent-type.toml")}}


# (argv with {placeholders}, expected exit status, text stderr must contain)
CASES = [
    (["validate", "/nonexistent"], EXIT_USAGE, "/nonexistent"),
    (["validate", "-v", "/nonexistent"], EXIT_USAGE, "No such file"),
    (["-q", "validate", "{dir}"], EXIT_USAGE, "Is a directory"),
    (["validate", "{bad_json}"], EXIT_FAILED, "translated_port: 70000 is not in range"),
    (["validate", "{doc_json}", "-v"], EXIT_OK, ""),
    (["convert", "{doc_json}"], EXIT_USAGE, "--to"),
    (["convert", "{doc_json}", "--to", "yaml"], EXIT_USAGE, "invalid choice"),
    (["nosuchcommand"], EXIT_USAGE, "invalid choice"),
    (["plot", "/nonexistent.json", "-o", "{dir}/x.png"], EXIT_USAGE, "cannot read the report /nonexistent.json"),
    (["plot", "{bad_toml}", "-o", "{dir}/x.png"], EXIT_USAGE, "not JSON"),
    (["testbed", "up", "--topology", "/nonexistent.toml", "--prefix", "nmbad"], EXIT_USAGE, "cannot read the file"),
    (["recover"], EXIT_USAGE, "--inventory"),
    (["migrate", "-i", "/nonexistent.toml"], EXIT_USAGE, "cannot read"),
    (["migrate", "-i", "{bad_toml}", "-q"], EXIT_USAGE, "not valid TOML"),
    (["migrate", "-i", "{port_toml}"], EXIT_USAGE, "agents.nat1.port: 'x' is not an integer"),
    (["migrate", "-i", "{inv}", "--from", "nat9"], EXIT_USAGE, "nat9"),
    (["migrate", "-i", "{inv}", "--settle", "soon"], EXIT_USAGE, "invalid float value"),
    (["migrate", "-v", "-i", "{inv}"], EXIT_FAILED, "agents.nat1.netns"),
    (["recover", "-i", "{inv}", "--json", "-"], EXIT_ATTENTION, "NOT consistent"),
    (["migrate", "-i", "{inv}", "--json", "{dir}"], EXIT_USAGE, "cannot write"),
    (["node", "nat9", "status", "-i", "{inv}"], EXIT_USAGE, "nat9"),
    (["node", "nat1", "status", "-i", "{inv}"], EXIT_FAILED, "agents.nat1.netns"),
    (["node", "nat1", "load", "{bad_json}", "-i", "{inv}"], EXIT_FAILED, "translated_port: 70000"),
    (["node", "nat1", "load", "/nonexistent.xml", "-i", "{inv}"], EXIT_USAGE, "/nonexistent.xml"),
    (["node", "nat1", "admission", "ajar", "-i", "{inv}"], EXIT_USAGE, "invalid choice"),
    (["node", "nat1", "sessions", "--filter", "colour=red", "-i", "{inv}"], EXIT_USAGE, "colour"),
    (["node", "nat1", "status"], EXIT_USAGE, "--inventory"),
    (["node", "nat1", "status", "-i", "{inv}", "--set", "agents.nat1.netns=nmnosuchns"], EXIT_FAILED, "agents.nat1.netns: network namespace nmnosuchns"),
    (["agent", "--config", "/nonexistent.toml"], EXIT_USAGE, "/nonexistent.toml"),
    (["agent", "--config", "{agent_toml}"], EXIT_USAGE, "no_such_key"),
    (["agent", "--config", "{agent_type_toml}"], EXIT_USAGE, "max_sessions"),
    (["agent", "--provider", "memory", "--listen", "127.0.0.1:99999"], EXIT_USAGE, "port must be"),
    (["agent", "--provider", "memory", "--listen", "127.0.0.1:0", "--passwords", "{plain}", "--host-key", "{dir}/hk"],
     EXIT_USAGE, "natmig agent passwd"),
    (["agent", "keygen", "--host-key", "{plain}/key"], EXIT_USAGE, "cannot create"),
]


@pytest.mark.parametrize("argv,code,says", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_invocation_exits_with_its_status_and_no_traceback(files: dict[str, str], argv: list[str], code: int, says: str) -> None:
    cp = run(*[a.format(**files) for a in argv])
    out = cp.stdout + cp.stderr
    assert "Traceback" not in out, out
    assert cp.returncode == code, out
    assert says in cp.stderr, cp.stderr
    if code != EXIT_OK:
        # A line names the command, as other tools' errors do.
        assert any(line.startswith("natmig") for line in cp.stderr.splitlines()), cp.stderr


def test_the_inventorys_plaintext_secret_and_the_agents_hashed_file_are_told_apart(tmp_path: Path) -> None:
    from natmig.agent.auth import set_password

    set_password(tmp_path / "agent.pw", "natmig", "secret")
    inv = _inventory(tmp_path)
    cp = run("node", "nat1", "status", "-i", str(inv), "--set", f"agents.nat1.password_file={tmp_path / 'agent.pw'}")
    assert cp.returncode == EXIT_USAGE and "Traceback" not in cp.stderr
    assert "hashed password file" in cp.stderr and "plaintext" in cp.stderr


@pytest.mark.parametrize("engine,phase", [("generic", "connect"), ("nat", "preflight")])
def test_json_dash_is_standard_output_alone(tmp_path: Path, engine: str, phase: str) -> None:
    cp = run("migrate", "-i", str(_inventory(tmp_path)), "--json", "-", "--set", f"migration.engine={engine}")
    assert cp.returncode == EXIT_FAILED, cp.stderr
    report = json.loads(cp.stdout)  # nothing else on stdout
    assert report["failed_phase"] == phase and report["outcome"] == "unchanged"
    assert "migration" in cp.stderr and f"FAILED in {phase}" in cp.stderr or "migration FAILED" in cp.stderr, cp.stderr
    assert f"natmig migrate: failed in phase {phase}" in cp.stderr, cp.stderr
    assert not (Path.cwd() / "-").exists()


def test_verbosity_is_accepted_before_and_after_every_subcommand() -> None:
    from natmig.cli import _subparsers, build_parser

    parser = build_parser()
    for p in [parser, *_subparsers(parser)]:
        opts = {s for a in p._actions for s in a.option_strings}
        assert {"-v", "-q", "--verbose", "--quiet"} <= opts, p.prog


@pytest.mark.root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_an_agent_without_netns_and_no_route_is_refused_naming_the_field(tmp_path: Path) -> None:
    # A new, empty network namespace: no route to the management address, and nothing can leave it.
    inv = _inventory(tmp_path, host="192.0.2.11", port=830)
    cp = subprocess.run(["unshare", "--net", sys.executable, "-m", "natmig.cli", "migrate", "-i", str(inv)],
                        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert cp.returncode == EXIT_FAILED, cp.stderr
    assert "no route to 192.0.2.11" in cp.stderr and "agents.nat1.netns" in cp.stderr
    assert "Traceback" not in cp.stderr
