"""The credential files an agent reads and a controller (or its demo) writes: password file and host key.

Passwords are stored as scrypt hashes (stdlib :func:`hashlib.scrypt`, salted,
parameters kept in each line so they can be raised later), one user a line::

    natmig:scrypt$16384$8$1$<salt b64>$<hash b64>

The host key is ECDSA P-256 by default: yuma123's yangcli (libssh2) cannot
use an RSA host key with SHA-1 signatures against a modern server, and every
client natmig tests with accepts ECDSA.

The file formats live here, not in the agent, so that the controller can
provision an agent (``natmig demo``) without importing agent code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

import asyncssh

from .errors import EXIT_USAGE, AgentError

HOST_KEY_ALGORITHMS = ("ecdsa-sha2-nistp256", "ssh-ed25519")
_SCRYPT = (16384, 8, 1)  # n, r, p: ~50 ms per check, 16 MB of memory


class AuthError(AgentError):
    """A key or password file is missing, unreadable or malformed."""

    exit_code = EXIT_USAGE


def load_or_create_host_key(path: str | os.PathLike[str], algorithm: str = "ecdsa-sha2-nistp256") -> asyncssh.SSHKey:
    """The private host key at ``path``; generated (mode 0600, with ``.pub``) when missing."""
    p = Path(path)
    if p.exists():
        try:
            return asyncssh.read_private_key(str(p))
        except (OSError, asyncssh.KeyImportError) as e:
            raise AuthError(f"host key {p}: cannot read it: {e}") from e
    if algorithm not in HOST_KEY_ALGORITHMS:
        raise AuthError(f"host key algorithm {algorithm!r}: use one of {', '.join(HOST_KEY_ALGORITHMS)}")
    key = asyncssh.generate_private_key(algorithm, comment="natmig-agent")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    key.write_public_key(str(p) + ".pub")
    return key


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password``, as stored in the password file."""
    n, r, pr = _SCRYPT
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=pr, dklen=32)
    return f"scrypt${n}${r}${pr}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches a stored hash (constant-time compare)."""
    try:
        scheme, n, r, pr, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(pr), dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(want, got)


def read_passwords(path: str | os.PathLike[str]) -> dict[str, str]:
    """user -> stored hash, from a password file."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise AuthError(f"password file {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith("scrypt$"):
            # Never echo the line: it may be a plaintext password.  The usual
            # mistake is the inventory's plaintext password_file given here.
            raise AuthError(
                f"password file {path}, line {n}: not a USER:scrypt$... line. The agent's --passwords file holds hashed "
                "passwords written by `natmig agent passwd FILE USER`; a file holding only a plaintext password is the "
                "controller's (the inventory's password_file), not the agent's")
        out[user] = stored
    return out


def set_password(path: str | os.PathLike[str], user: str, password: str) -> None:
    """Add or change ``user`` in a password file (created mode 0600; replaced atomically)."""
    if not user or ":" in user or user != user.strip():
        raise AuthError(f"user name {user!r}: must be non-empty, without ':' or surrounding blanks")
    if not password:
        raise AuthError("empty passwords are not accepted")
    p = Path(path)
    users = read_passwords(p) if p.exists() else {}
    users[user] = hash_password(password)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{u}:{h}\n" for u, h in users.items()))
    os.replace(tmp, p)
