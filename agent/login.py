"""The SSH login of an agent's clients: credentials checked off the event loop, guessing slowed down.

One :class:`Login` per SSH connection (asyncssh's ``SSHServer`` callbacks);
the :class:`Gate` they share holds the credentials, the backoff and the
threads that hash passwords.  A password check is one scrypt (~50 ms of
CPU, 16 MB): run on the event loop it stalled every other session (up to
190 ms measured), so it runs on the gate's own two threads -- never on the
pool that serves RPCs, which a flood of logins would otherwise take over.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import asyncssh

from .auth import Authenticator, AuthError
from .throttle import Throttle

log = logging.getLogger(__name__)

#: Threads hashing passwords at once: bounds the CPU a login flood can take.
HASH_THREADS = 2


class Gate:
    """What every connection's login shares: credentials, backoff, hashing threads."""

    def __init__(self, auth: Authenticator, throttle: Throttle | None = None) -> None:
        self.auth = auth
        self.throttle = throttle or Throttle()
        self.hasher = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="natmig-login")

    def close(self) -> None:
        """Stop the hashing threads (agent shutdown)."""
        self.hasher.shutdown(wait=False, cancel_futures=True)


class Login(asyncssh.SSHServer):
    """asyncssh's view of one connection's authentication."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.method = "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        conn.set_extra_info(natmig_auth=self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn = None  # the connection and this object refer to each other: let both go now

    def begin_auth(self, username: str) -> bool:
        try:
            keys = self.gate.auth.authorized_keys(username)
        except AuthError as e:
            log.error("public keys of %r not loaded: %s", username, e)
            keys = None
        if keys is not None and self.conn is not None:
            self.conn.set_authorized_keys(keys)
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return self.gate.auth.passwords_path is not None

    async def validate_password(self, username: str, password: str) -> bool:
        keys = [f"source {self.peer}", f"user {username!r}"]
        throttle = self.gate.throttle
        wait = throttle.admit(keys)
        if wait is None:
            log.info("password attempt for %r from %s refused unchecked: attempts too frequent after %d failures",
                     username, self.peer, max(throttle.failures(k) for k in keys))
            return False
        if wait > 0:
            await asyncio.sleep(wait)
        ok = await asyncio.get_running_loop().run_in_executor(self.gate.hasher, self.gate.auth.check_password, username, password)
        if ok:
            throttle.succeeded(keys)
            self.method = "password"
        else:
            throttle.failed(keys)
            log.warning("password refused for %r from %s", username, self.peer)
        return ok

    def public_key_auth_supported(self) -> bool:
        return self.gate.auth.keys_path is not None

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Only reached for keys not in the authorized_keys set of begin_auth.
        return False

    def auth_completed(self) -> None:
        if self.method == "?":
            self.method = "publickey"
