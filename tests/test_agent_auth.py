"""Credentials of the agent: password hashes and file, host key creation, the CLI's --listen."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import asyncssh
import pytest

from natmig.agent.auth import AuthError, Authenticator, check_password, hash_password, load_or_create_host_key, read_passwords, set_password
from natmig.agent.cli import parse_listen


def test_hash_is_salted_and_checks() -> None:
    a, b = hash_password("s3cret"), hash_password("s3cret")
    assert a != b and a.startswith("scrypt$")
    assert check_password(a, "s3cret") and not check_password(a, "s3cret ") and not check_password("garbage", "s3cret")


def test_password_file_round_trip_and_mode(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    set_password(f, "alice", "one")
    set_password(f, "bob", "two")
    set_password(f, "alice", "three")  # change
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    users = read_passwords(f)
    assert set(users) == {"alice", "bob"} and check_password(users["alice"], "three")
    auth = Authenticator(str(f), None)
    assert auth.check_password("bob", "two") and not auth.check_password("bob", "one") and not auth.check_password("carol", "two")


@pytest.mark.parametrize("user,pw", [("", "x"), ("a:b", "x"), ("alice", "")])
def test_bad_users_and_passwords_are_refused(tmp_path: Path, user: str, pw: str) -> None:
    with pytest.raises(AuthError):
        set_password(tmp_path / "pw", user, pw)


def test_malformed_password_file_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("# users\nalice:plaintext\n")
    with pytest.raises(AuthError, match="line 2"):
        read_passwords(f)


def test_never_anonymous() -> None:
    with pytest.raises(AuthError, match="anonymous"):
        Authenticator(None, None)


def test_host_key_is_created_once_as_ecdsa(tmp_path: Path) -> None:
    k1 = load_or_create_host_key(tmp_path / "hk")
    assert k1.get_algorithm() == "ecdsa-sha2-nistp256"
    assert stat.S_IMODE((tmp_path / "hk").stat().st_mode) == 0o600
    assert (tmp_path / "hk.pub").read_text().startswith("ecdsa-sha2-nistp256 ")
    k2 = load_or_create_host_key(tmp_path / "hk")
    assert k2.get_fingerprint() == k1.get_fingerprint()
    assert load_or_create_host_key(tmp_path / "ed", "ssh-ed25519").get_algorithm() == "ssh-ed25519"
    with pytest.raises(AuthError):
        load_or_create_host_key(tmp_path / "rsa", "ssh-rsa")


def test_authorized_keys_file_per_user(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "ak.natmig").write_bytes(key.export_public_key())
    auth = Authenticator(None, str(tmp_path / "ak.%u"))
    assert auth.authorized_keys("natmig") is not None
    assert auth.authorized_keys("ops") is None  # no file: no keys
    assert auth.keys_file("../etc") is None and auth.keys_file("") is None
    (tmp_path / "ak.bad").write_text("not a key\n")
    with pytest.raises(AuthError, match="ak.bad"):
        auth.authorized_keys("bad")
    # A path without %u would let a key stand for any user name.
    with pytest.raises(AuthError, match="%u"):
        Authenticator(None, str(tmp_path / "ak.natmig"))


@pytest.mark.parametrize("text,want", [("192.0.2.11:830", ("192.0.2.11", 830)), ("192.0.2.11", ("192.0.2.11", 830)),
                                       ("[2001:db8::1]:8300", ("2001:db8::1", 8300)), (":1830", ("0.0.0.0", 1830))])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


def test_parse_listen_refuses_bad_ports() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_listen("192.0.2.11:99999")
