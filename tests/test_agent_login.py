"""Logins: backoff per source and per user, equal work for unknown users, hashing off the event loop, keys bound to their user."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from natmig import credentials as credentials_mod
from natmig.agent.auth import Authenticator, set_password
from natmig.agent.throttle import Throttle

from .test_agent_ssh import RunningAgent, agent  # noqa: F401 - agent is a fixture


# ------------------------------------------------------------------ Throttle


def test_throttle_lets_the_first_failures_through_then_spaces_attempts_up_to_its_cap() -> None:
    t = Throttle(base=1.0, cap=4.0, free=2)
    k = ["source 192.0.2.7"]
    assert t.admit(k, now=0) == 0
    t.failed(k, now=0)
    assert t.admit(k, now=0) == 0
    t.failed(k, now=0)  # the second failure: from now on, turns
    assert t.admit(k, now=0) == 1.0
    t.failed(k, now=1)
    assert t.admit(k, now=1) == 2.0  # 2**1 s after the last failure
    t.failed(k, now=3)
    t.failed(k, now=3)
    t.failed(k, now=3)
    assert t.admit(k, now=3) == 4.0  # capped
    # Parallel attempts queue up turn after turn; past the cap they are refused unchecked.
    assert t.admit(k, now=3) is None
    t.succeeded(k)
    assert t.admit(k, now=3) == 0 and t.failures(k[0]) == 0


def test_throttle_keys_are_independent_and_an_attempt_waits_for_the_slowest(caplog: pytest.LogCaptureFixture) -> None:
    t = Throttle(base=1.0, cap=8.0, free=1)
    with caplog.at_level(logging.WARNING, logger="natmig.agent.throttle"):
        t.failed(["user 'natmig'"], now=0)
    assert any("1 failed logins for user 'natmig'" in r.getMessage() for r in caplog.records)
    assert t.admit(["source 192.0.2.8"], now=0) == 0
    assert t.admit(["source 192.0.2.8", "user 'natmig'"], now=0) == 1.0


def test_throttle_forgets_old_failures_and_bounds_its_table() -> None:
    t = Throttle(free=1, forget=10.0, max_keys=100)
    for i in range(1000):
        t.failed([f"user 'u{i}'"], now=float(i) / 100)
    assert len(t._keys) <= 100
    t.failed(["user 'late'"], now=10_000.0)
    for _ in range(300):
        t.failed(["user 'late'"], now=10_000.0)
    assert set(t._keys) == {"user 'late'"}


# ------------------------------------------------------------ over SSH


async def _try(port: int, user: str, password: str) -> bool:
    try:
        async with asyncssh.connect("127.0.0.1", port, username=user, password=password, known_hosts=None, client_keys=None, preferred_auth="password"):
            return True
    except asyncssh.PermissionDenied:
        return False


def test_password_guessing_is_slowed_per_source_and_per_user(agent: RunningAgent, caplog: pytest.LogCaptureFixture) -> None:
    agent.agent.gate.throttle = Throttle(base=0.3, cap=1.2, free=2)
    with caplog.at_level(logging.WARNING, logger="natmig.agent"):
        t0 = time.monotonic()
        results = [asyncio.run(_try(agent.port, "natmig", f"guess{i}")) for i in range(5)]
        took = time.monotonic() - t0
    assert results == [False] * 5
    assert took >= 0.3 + 0.6 + 1.2 - 0.1, f"5 guesses took {took:.2f} s"  # free, free, then turns 0.3, 0.6, 1.2 s apart
    assert any("failed logins for user 'natmig'" in r.getMessage() for r in caplog.records)
    assert any("failed logins for source 127.0.0.1" in r.getMessage() for r in caplog.records)

    # Eight guesses at once gain nothing: past the cap they are refused without a check.
    checked = []
    real = agent.agent.auth.check_password
    agent.agent.auth.check_password = lambda u, p: checked.append(u) or real(u, p)  # type: ignore[method-assign]

    async def burst() -> list[bool]:
        return list(await asyncio.gather(*(_try(agent.port, "natmig", f"burst{i}") for i in range(8))))

    assert asyncio.run(burst()) == [False] * 8
    assert len(checked) <= 2, checked
    # The right password, its turn come, gets in and clears the record.
    time.sleep(1.3)
    assert asyncio.run(_try(agent.port, "natmig", "secret"))
    assert agent.agent.gate.throttle.failures("user 'natmig'") == 0


def test_unknown_users_cost_one_hash_like_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_password(tmp_path / "pw", "natmig", "secret")
    auth = Authenticator(str(tmp_path / "pw"), None)
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*a: object, **kw: object) -> bytes:
        calls.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(credentials_mod.hashlib, "scrypt", counting)  # where the hash is computed
    assert not auth.check_password("natmig", "wrong")
    known = len(calls)
    calls.clear()
    assert not auth.check_password("nobody", "wrong")
    assert len(calls) == known == 1


def test_passwords_are_hashed_off_the_event_loop(agent: RunningAgent) -> None:
    threads: list[str] = []
    real = agent.agent.auth.check_password
    agent.agent.auth.check_password = lambda u, p: threads.append(threading.current_thread().name) or real(u, p)  # type: ignore[method-assign]
    with agent.client() as c:
        assert c.get_sessions() == []
    assert threads and all(n.startswith("natmig-login") for n in threads), threads


def test_a_key_authenticates_only_the_user_it_is_listed_for(agent: RunningAgent, tmp_path: Path) -> None:
    set_password(agent.tmp / "passwords", "ops", "ops-secret")
    key = str(agent.tmp / "id_ed25519")  # listed in authorized_keys.natmig only

    async def as_user(user: str) -> bool:
        try:
            async with asyncssh.connect("127.0.0.1", agent.port, username=user, client_keys=[key], known_hosts=None, password=None, preferred_auth="publickey"):
                return True
        except asyncssh.PermissionDenied:
            return False

    assert asyncio.run(as_user("natmig"))
    assert not asyncio.run(as_user("ops"))
    assert not asyncio.run(as_user("anyone"))
