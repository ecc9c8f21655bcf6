"""Who may talk to the agent: its SSH host key, a password file, authorized public keys.

The file formats (scrypt password file, host key) are in
:mod:`natmig.credentials`, which the controller's demo uses too; this module
is what the agent checks a login against.
"""

from __future__ import annotations

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


class Authenticator:
    """The agent's credentials; files are re-read per connection so changes apply without restart."""

    def __init__(self, passwords: str | None, authorized_keys: str | None) -> None:
        if not passwords and not authorized_keys:
            raise AuthError("no credentials configured: give a password file and/or an authorized_keys file (anonymous access is never allowed)")
        self.passwords_path = passwords
        self.keys_path = authorized_keys
        # Fail at start-up, not at the first login, when a file is bad.
        if passwords:
            read_passwords(passwords)
        if authorized_keys:
            self.authorized_keys()

    def check_password(self, user: str, password: str) -> bool:
        """Whether ``user`` / ``password`` is valid now."""
        if not self.passwords_path:
            return False
        stored = read_passwords(self.passwords_path).get(user)
        # Unknown users cost a hash too, so timing does not tell who exists.
        return check_password(stored or hash_password("x"), password) and stored is not None

    def authorized_keys(self) -> asyncssh.SSHAuthorizedKeys | None:
        """The authorized keys (valid for any user name), or None."""
        if not self.keys_path:
            return None
        try:
            return asyncssh.read_authorized_keys(self.keys_path)
        except (OSError, ValueError, asyncssh.KeyImportError) as e:
            raise AuthError(f"authorized_keys {self.keys_path}: {e}") from e
