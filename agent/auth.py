"""Who may talk to the agent: its SSH host key, a password file, authorized public keys.

The file formats (scrypt password file, host key) are in
:mod:`natmig.credentials`, which the controller's demo uses too; this module
is what the agent checks a login against.

Public keys are bound to their user: ``--authorized-keys`` is a path with
``%u`` (as sshd's AuthorizedKeysFile), one OpenSSH authorized_keys file per
user, e.g. ``/etc/natmig/authorized_keys/%u``; a key authenticates only the
user whose file lists it.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

import asyncssh

from ..credentials import (
    HOST_KEY_ALGORITHMS,
    AuthError,
    check_password,
    hash_password,
    load_or_create_host_key,
    read_passwords,
    set_password,
)

__all__ = ["HOST_KEY_ALGORITHMS", "AuthError", "Authenticator", "check_password", "hash_password",
           "load_or_create_host_key", "read_passwords", "set_password"]

log = logging.getLogger(__name__)

#: User names that may have an authorized_keys file (the name becomes part of a path).
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


class Authenticator:
    """The agent's credentials; files are re-read per connection so changes apply without restart."""

    def __init__(self, passwords: str | None, authorized_keys: str | None) -> None:
        if not passwords and not authorized_keys:
            raise AuthError("no credentials configured: give a password file and/or an authorized_keys file (anonymous access is never allowed)")
        if authorized_keys and "%u" not in authorized_keys:
            raise AuthError(f"authorized_keys {authorized_keys}: keys must be bound to their user: give a path with %u, "
                            "replaced by the user name (e.g. /etc/natmig/authorized_keys/%u, one OpenSSH authorized_keys file per user)")
        self.passwords_path = passwords
        self.keys_path = authorized_keys
        # Fail at start-up, not at the first login, when a file is bad.
        if passwords:
            read_passwords(passwords)
        # What an unknown user's password is checked against: the same work as
        # for a known one (one scrypt with the default parameters), so login
        # time does not tell who exists (measured before: 110 ms vs 78 ms).
        self._dummy = hash_password(secrets.token_hex(16))

    def check_password(self, user: str, password: str) -> bool:
        """Whether ``user`` / ``password`` is valid now."""
        if not self.passwords_path:
            return False
        try:
            stored = read_passwords(self.passwords_path).get(user)
        except AuthError as e:
            # Re-read per login: an operator's broken edit must say so in the
            # log, or every login just fails with no reason anywhere.
            log.error("login of %r refused: %s", user, e)
            stored = None
        ok = check_password(stored or self._dummy, password)
        return ok and stored is not None

    def keys_file(self, user: str) -> Path | None:
        """The authorized_keys file of ``user`` (the ``%u`` of the path replaced), or None: no keys for such a name."""
        if not self.keys_path or not _USER_NAME.fullmatch(user):
            return None  # a name that could climb out of the directory has no keys
        return Path(self.keys_path.replace("%u", user))

    def authorized_keys(self, user: str) -> asyncssh.SSHAuthorizedKeys | None:
        """The keys that authenticate ``user`` (and no other), or None when it has none."""
        path = self.keys_file(user)
        if path is None or not path.exists():
            return None
        try:
            return asyncssh.read_authorized_keys(str(path))
        except (OSError, ValueError, asyncssh.KeyImportError) as e:
            raise AuthError(f"authorized_keys {path}: {e}") from e
