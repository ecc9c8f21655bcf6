"""The errors of the controller's NETCONF client, and an ncclient ``RPCError`` turned into the first of them.

:class:`NetconfError` carries the ``rpc-error``'s own fields (RFC 6241 4.3);
the others say why there is no session (or no longer one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ncclient import operations as nc_ops

from ..errors import ControllerError

@dataclass(frozen=True)
class RpcErrorInfo:
    """One ``rpc-error`` of a reply (RFC 6241 4.3), field by field."""

    tag: str | None
    severity: str | None
    type: str | None
    path: str | None
    message: str | None
    info: str | None


class NetconfError(ControllerError):
    """The agent answered with ``rpc-error`` (first error's fields; all of them in ``errors``)."""

    def __init__(self, operation: str, errors: Sequence[RpcErrorInfo]) -> None:
        self.operation = operation
        self.errors = list(errors)
        first = self.errors[0] if self.errors else RpcErrorInfo(None, None, None, None, None, None)
        self.tag = first.tag
        self.severity = first.severity
        self.type = first.type
        self.path = first.path
        self.message = first.message
        self.info = first.info
        lines = [f"{e.tag}: {e.message or ''}" + (f" (at {e.path})" if e.path else "") for e in self.errors]
        super().__init__(f"{operation} refused by the agent: " + "; ".join(lines))


class HostKeyError(ControllerError):
    """The agent's SSH host key is not the one known for it: nothing was sent."""


class ConnectError(ControllerError):
    """The agent could not be reached, or refused the credentials."""


class AuthenticationRefused(ConnectError):
    """The agent was reached and refused the user name, password or key."""


class SessionLost(ControllerError):
    """The NETCONF session ended (closed, killed, or the agent went away)."""


def rpc_error(operation: str, e: nc_ops.RPCError) -> NetconfError:
    errs = getattr(e, "errors", None) or [e]
    return NetconfError(
        operation,
        [RpcErrorInfo(x.tag, x.severity, x.type, (x.path or "").strip() or None, (x.message or "").strip() or None, x.info) for x in errs],
    )
