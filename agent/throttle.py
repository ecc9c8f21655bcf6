"""Slowing password guessing: a backoff per source address and per user name, with a cap.

Measured before: ~60 guesses a second with 8 clients, 50 on one connection,
no delay at all.  Now each key (``source 192.0.2.7``, ``user natmig``) may
fail :attr:`Throttle.free` times freely; after that each attempt for the key
waits its turn, the turns ``base * 2**k`` seconds apart (k: failures past the
free ones), never more than ``cap``.  Attempts that would have to wait more
than ``cap`` are refused without their password being checked, so many
parallel connections gain nothing over one.  A success clears its source and
its user.  Keys without a failure for ``forget`` seconds are forgotten, and
at most ``max_keys`` are kept (the oldest go), so guessing with random user
names cannot grow the table without bound.

Per user means a guesser slows the real user too -- at most by ``cap`` a try,
and public-key logins are not throttled.  Runs on the event loop only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class _Record:
    failures: int = 0
    next_try: float = 0.0
    last: float = 0.0


class Throttle:
    """Failed logins per key and when the key's next attempt may be checked."""

    def __init__(self, base: float = 0.5, cap: float = 16.0, free: int = 3, forget: float = 900.0, max_keys: int = 4096) -> None:
        self.base = base
        self.cap = cap
        self.free = free
        self.forget = forget
        self.max_keys = max_keys
        self._keys: dict[str, _Record] = {}
        self._since_prune = 0

    def admit(self, keys: list[str], now: float | None = None) -> float | None:
        """Seconds this attempt must wait before its password is checked; None: refuse it unchecked."""
        now = time.monotonic() if now is None else now
        turn = now
        for k in keys:
            r = self._keys.get(k)
            if r is not None and r.failures >= self.free:
                turn = max(turn, r.next_try)
        if turn - now > self.cap:
            return None
        for k in keys:
            r = self._keys.get(k)
            if r is not None and r.failures >= self.free:
                r.next_try = turn + self._delay(r.failures)
        return turn - now

    def failed(self, keys: list[str], now: float | None = None) -> None:
        """One more failure for each key (logged when a key starts to be slowed, and at each doubling)."""
        now = time.monotonic() if now is None else now
        self._prune(now)
        for k in keys:
            r = self._keys.setdefault(k, _Record())
            r.failures += 1
            r.last = now
            if r.failures >= self.free:
                r.next_try = max(r.next_try, now + self._delay(r.failures))
                n = r.failures
                if n == self.free or n & (n - 1) == 0:
                    log.warning("%d failed logins for %s: its attempts are now %.1f s apart (cap %.0f s)", n, k, self._delay(n), self.cap)

    def succeeded(self, keys: list[str]) -> None:
        """A login succeeded: its keys start afresh."""
        for k in keys:
            self._keys.pop(k, None)

    def failures(self, key: str) -> int:
        """Failures counted for ``key``."""
        r = self._keys.get(key)
        return r.failures if r is not None else 0

    def _delay(self, failures: int) -> float:
        return min(self.cap, self.base * 2 ** min(failures - self.free, 32))

    def _prune(self, now: float) -> None:
        self._since_prune += 1
        if len(self._keys) < self.max_keys and self._since_prune < 256:
            return
        self._since_prune = 0
        for k in [k for k, r in self._keys.items() if now - r.last > self.forget]:
            del self._keys[k]
        if len(self._keys) >= self.max_keys:
            for k in sorted(self._keys, key=lambda k: self._keys[k].last)[: len(self._keys) - self.max_keys // 2]:
                del self._keys[k]
