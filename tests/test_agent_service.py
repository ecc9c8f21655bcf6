"""The agent as a service: its config file and flag precedence, the systemd unit's ExecStart (readiness, pidfile), keygen."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from natmig.agent import config as agent_config
from natmig.agent.auth import set_password
from natmig.cli import build_parser
from natmig.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "natmig-agent@.service.in"


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["agent", *argv])
    return agent_config.resolve(args, args.agent_options)


def test_the_config_file_sets_what_no_flag_gives_and_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('provider = "memory"\nlisten = "127.0.0.1:8830"\npublic_address = "203.0.113.7"\n'
                   'max-sessions = 3\nmax_message = 5000\ninside_if = "x0"\nidle_timeout = 9\n')
    a = parse("--config", str(cfg))
    assert (a.provider, a.listen, a.public_address, a.max_sessions, a.max_message, a.inside_if, a.idle_timeout) == \
        ("memory", ("127.0.0.1", 8830), ["203.0.113.7"], 3, 5000, "x0", 9.0)
    # Flags win, even one spelled with its default value; flags may come before or after --config.
    b = parse("--max-sessions", "16", "--config", str(cfg), "--inside-if", "inside0", "--listen", "127.0.0.1:0")
    assert (b.max_sessions, b.inside_if, b.listen, b.max_message) == (16, "inside0", ("127.0.0.1", 0), 5000)


def test_every_agent_flag_has_a_config_key(tmp_path: Path) -> None:
    args = build_parser().parse_args(["agent"])
    sample = {int: "7", float: "1.5"}
    for dest, action in args.agent_options.items():
        if action.nargs == 0:
            text = "true"
        elif action.choices:
            text = f'"{sorted(action.choices)[0]}"'
        elif action.type in sample:
            text = sample[action.type]
        elif dest == "listen":
            text = '"127.0.0.1:1830"'
        elif dest == "call_home":
            text = '["192.0.2.254:4334"]'
        else:
            text = '"/x/y"' if dest != "public_address" else '["203.0.113.9"]'
        f = tmp_path / f"{dest}.toml"
        f.write_text(f"{dest} = {text}\n")
        got = agent_config.load(str(f), args.agent_options)
        assert list(got) == [dest], dest
    # The flags `natmig agent -h` lists are exactly the keys (plus --config itself and -v/-q).
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["agent"]._actions if a.option_strings}
    assert flags - set(args.agent_options) == {"help", "config", "verbose", "quiet"}


@pytest.mark.parametrize("text,says", [
    ("colour = 1", "colour: unknown key"),
    ('max_sessions = "x"', "max_sessions: 'x' is not an integer"),
    ('provider = "disk"', "provider: 'disk' is not one of"),
    ('listen = "127.0.0.1:70000"', "port must be 0..65535"),
    ("public_address = [1]", "public_address: 1 is not a string"),
    ("max_sessions = true", "max_sessions"),
    ("[x", "not valid TOML"),
])
def test_a_bad_config_names_the_key(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "a.toml").write_text(text + "\n")
    with pytest.raises(UsageError, match=re.escape(says)):
        parse("--config", str(tmp_path / "a.toml"))


def _unit_command(tmp: Path, instance: str) -> list[str]:
    """The unit's ExecStart, with the paths `make install-systemd` fills in, pointing at tmp for the config."""
    line = next(l for l in UNIT.read_text().splitlines() if l.startswith("ExecStart="))
    natmig = str(Path(sys.executable).parent / "natmig")
    return shlex.split(line.removeprefix("ExecStart=").replace("@NATMIG@", natmig).replace("@SYSCONFDIR@", str(tmp)).replace("%i", instance))


def test_the_units_execstart_runs_and_notifies_readiness(tmp_path: Path) -> None:
    conf = tmp_path / "natmig" / "agent"
    conf.mkdir(parents=True)
    set_password(tmp_path / "pw", "natmig", "secret")
    (conf / "t1.toml").write_text(
        f'provider = "memory"\nlisten = "127.0.0.1:0"\npublic_address = "203.0.113.1"\npasswords = "{tmp_path / "pw"}"\n'
        f'host_key = "{tmp_path / "hk"}"\npidfile = "{tmp_path / "agent.pid"}"\nstate_dir = "{tmp_path / "state"}"\n')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    proc = subprocess.Popen(_unit_command(tmp_path, "t1"), env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.splitlines() and f"MAINPID={proc.pid}" in msg and "STATUS=listening on 127.0.0.1:" in msg, msg
        assert (tmp_path / "agent.pid").read_text().strip() == str(proc.pid)
        assert (tmp_path / "hk.pub").exists()
        os.kill(proc.pid, signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(15) == 0
        assert not (tmp_path / "agent.pid").exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        notify.close()


def test_the_unit_file_is_accepted_by_systemd_analyze(tmp_path: Path) -> None:
    analyze = subprocess.run(["sh", "-c", "command -v systemd-analyze"], capture_output=True, text=True).stdout.strip()
    if not analyze:
        pytest.skip("no systemd-analyze")
    natmig = Path(sys.executable).parent / "natmig"
    unit = tmp_path / "natmig-agent@.service"
    unit.write_text(UNIT.read_text().replace("@NATMIG@", str(natmig)).replace("@SYSCONFDIR@", str(tmp_path)))
    cp = subprocess.run([analyze, "verify", f"{unit}"], capture_output=True, text=True, timeout=60)
    # Documentation=man:natmig(1) is checked against installed man pages: not this test's business.
    problems = [l for l in cp.stderr.splitlines() if "natmig-agent@" in l and "Command 'man " not in l]
    assert not problems, cp.stderr


def test_keygen_creates_the_key_once_and_prints_the_known_hosts_line(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(f'listen = "192.0.2.11:830"\nhost_key = "{tmp_path / "hk"}"\n')
    run = [sys.executable, "-m", "natmig.cli", "agent", "--config", str(tmp_path / "a.toml"), "keygen"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "created" in first.stderr, first.stderr
    kind, blob = (tmp_path / "hk.pub").read_text().split()[:2]
    assert first.stdout == f"[192.0.2.11]:830 {kind} {blob}\n"
    again = subprocess.run(run + ["--address", "192.0.2.12:8830"], capture_output=True, text=True, timeout=60)
    assert again.stdout == f"[192.0.2.12]:8830 {kind} {blob}\n" and "exists" in again.stderr


def test_the_example_config_is_valid() -> None:
    args = build_parser().parse_args(["agent"])
    got = agent_config.load(str(ROOT / "systemd" / "agent.toml.example"), args.agent_options)
    assert got["netns"] == "nat1" and got["listen"] == ("192.0.2.11", 830) and got["state_dir"] == "/run/natmig-agent/nat1"


def test_a_required_flag_may_come_from_the_config_file(tmp_path: Path) -> None:
    # Should a flag become required (--listen may), the config file can still give it, and passwd needs neither.
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--config")
    options = agent_config.track_given(parser)
    (tmp_path / "a.toml").write_text('listen = "127.0.0.1:1"\n')
    assert agent_config.resolve(parser.parse_args(["--config", str(tmp_path / "a.toml")]), options).listen == "127.0.0.1:1"
    with pytest.raises(UsageError, match="--listen is required"):
        agent_config.resolve(parser.parse_args([]), options)


def test_keygen_without_a_listen_address_prints_a_placeholder(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "natmig.cli", "agent", "keygen", "--host-key", str(tmp_path / "hk")]
    cp = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and cp.stdout.startswith("[ADDRESS]:830 ") and "give --address" in cp.stderr, cp.stderr
    cp = subprocess.run(run + ["--address", "192.0.2.11"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and cp.stdout.startswith("[192.0.2.11]:830 "), cp.stderr
