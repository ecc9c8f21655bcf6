"""NETCONF access control (RFC 8341, the part an agent of live state needs): who may read, write and run what.

Users belong to groups; rule lists, in order, apply to the groups they
name; within a list the first rule that matches an operation decides
(permit or deny); when none does, the defaults decide.  RFC 8341 3.4.

What an operation needs here:

- ``read``: get, get-config, get-schema, validate, create-subscription;
- ``write``: edit-config, copy-config, delete-config, commit, discard-changes,
  cancel-commit, lock, unlock, kill-session.  Lock is a write because it
  reserves the configuration: a reader that locked running would stop a
  migration as surely as one that wrote it.  Kill-session ends other users'
  sessions.  An edit also needs write on each module it touches (the
  namespaces of the <config> it carries): admission (nat-control,
  natmig-state's state-control) is a module like any other;
- close-session is always permitted (RFC 8341 3.2.5).

Defaults (RFC 8341's): read permitted, write denied, exec permitted.  So a
user no rule list names can read and cannot change anything, and the
operator grants writes by group.  The rules come from a TOML file the
operator edits (``natmig agent --nacm FILE``); without one, access control
is off and every authenticated user may do everything, as before.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import AgentError

#: operation -> the access it needs.
NEEDS: dict[str, str] = {
    "get": "read", "get-config": "read", "get-schema": "read", "validate": "read", "create-subscription": "read",
    # nat-session's own: they read what get and get-config read, cut by key range.
    "get-range-digests": "read", "get-range-sessions": "read",
    "edit-config": "write", "copy-config": "write", "delete-config": "write", "commit": "write",
    "discard-changes": "write", "cancel-commit": "write", "lock": "write", "unlock": "write", "kill-session": "write",
}
ACCESS = ("read", "write", "exec")
ACTIONS = ("permit", "deny")


class NacmError(AgentError):
    """The access-control file is unreadable or wrong (the message names the key)."""


@dataclass(frozen=True)
class Rule:
    """One rule: what it matches (``*``: anything) and its action."""

    name: str
    module: str = "*"
    rpc: str = "*"
    access: str = "*"
    action: str = "deny"

    def matches(self, operation: str, access: str, modules: Iterable[str]) -> bool:
        if self.rpc not in ("*", operation):
            return False
        if self.access not in ("*", access):
            return False
        return self.module == "*" or self.module in set(modules)


@dataclass(frozen=True)
class RuleList:
    name: str
    groups: tuple[str, ...]
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Decision:
    permitted: bool
    why: str


class AccessControl:
    """Decides, per user and operation (thread-safe: immutable once loaded)."""

    def __init__(self, groups: dict[str, frozenset[str]], rule_lists: list[RuleList],
                 defaults: dict[str, str] | None = None, enabled: bool = True) -> None:
        self.groups = groups
        self.rule_lists = rule_lists
        self.defaults = {"read": "permit", "write": "deny", "exec": "permit", **(defaults or {})}
        self.enabled = enabled

    def groups_of(self, user: str) -> set[str]:
        return {g for g, users in self.groups.items() if user in users}

    def decide(self, user: str, operation: str, modules: Iterable[str] = ()) -> Decision:
        """Whether ``user`` may run ``operation`` on ``modules`` (the namespaces' modules an edit touches)."""
        if not self.enabled or operation == "close-session":
            return Decision(True, "access control is off" if not self.enabled else "close-session is always permitted")
        access = NEEDS.get(operation, "exec")
        mine = self.groups_of(user)
        # An edit that touches several modules needs each of them: a rule for one is no licence for another.
        targets: list[str | None] = [*modules] or [None]
        for module in targets:
            d = self._decide(mine, operation, access, module)
            if not d.permitted or module is None:
                return d
        return Decision(True, "every module touched is permitted")

    def _decide(self, groups: set[str], operation: str, access: str, module: str | None) -> Decision:
        for rl in self.rule_lists:
            if not (groups & set(rl.groups)) and "*" not in rl.groups:
                continue
            for r in rl.rules:
                if r.matches(operation, access, [] if module is None else [module]):
                    return Decision(r.action == "permit", f"rule {rl.name}/{r.name}" + (f" for {module}" if module else ""))
        action = self.defaults[access]
        return Decision(action == "permit", f"{access}-default {action}" + (f" for {module}" if module else ""))


def _str_list(where: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise NacmError(f"{where}: a list of names")
    return tuple(v)


def load(path: str | Path) -> AccessControl:
    """Read the operator's rules (TOML).  Example::

        write-default = "deny"           # read-default, write-default, exec-default: permit or deny
        [groups]
        admin = ["natmig"]               # group -> users
        operators = ["alice"]
        [[rule-list]]
        name = "admin"
        groups = ["admin"]
        rule = [{ name = "all", action = "permit" }]
        [[rule-list]]
        name = "operators"
        groups = ["operators"]
        rule = [{ name = "admission", module = "natmig-state", access = "write", action = "permit" },
                { name = "no-kill", rpc = "kill-session", action = "deny" }]
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise NacmError(f"cannot read the access-control file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise NacmError(f"{path}: not TOML: {e}") from e
    known = {"enable", "read-default", "write-default", "exec-default", "groups", "rule-list"}
    for k in data:
        if k not in known:
            raise NacmError(f"{path}: {k}: unknown key (known: {', '.join(sorted(known))})")
    defaults = {}
    for a in ACCESS:
        v = data.get(f"{a}-default")
        if v is not None:
            if v not in ACTIONS:
                raise NacmError(f"{path}: {a}-default: {v!r} is not permit or deny")
            defaults[a] = v
    groups_raw = data.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise NacmError(f"{path}: groups: a table of group = [users]")
    groups = {g: frozenset(_str_list(f"{path}: groups.{g}", users)) for g, users in groups_raw.items()}
    lists = []
    for i, rl in enumerate(data.get("rule-list", [])):
        where = f"{path}: rule-list[{i}]"
        if not isinstance(rl, dict) or "name" not in rl:
            raise NacmError(f"{where}: needs a name")
        for k in rl:
            if k not in ("name", "groups", "rule"):
                raise NacmError(f"{where}.{k}: unknown key (known: name, groups, rule)")
        rules = []
        for j, r in enumerate(rl.get("rule", [])):
            rw = f"{where}.rule[{j}]"
            if not isinstance(r, dict) or "name" not in r:
                raise NacmError(f"{rw}: needs a name")
            for k in r:
                if k not in ("name", "module", "rpc", "access", "action"):
                    raise NacmError(f"{rw}.{k}: unknown key (known: name, module, rpc, access, action)")
            if r.get("access", "*") not in (*ACCESS, "*"):
                raise NacmError(f"{rw}.access: {r['access']!r} is not read, write, exec or *")
            if r.get("action", "deny") not in ACTIONS:
                raise NacmError(f"{rw}.action: {r['action']!r} is not permit or deny")
            rules.append(Rule(str(r["name"]), str(r.get("module", "*")), str(r.get("rpc", "*")), str(r.get("access", "*")), str(r.get("action", "deny"))))
        lists.append(RuleList(str(rl["name"]), _str_list(f"{where}.groups", rl.get("groups", [])), tuple(rules)))
    enabled = data.get("enable", True)
    if not isinstance(enabled, bool):
        raise NacmError(f"{path}: enable: true or false")
    return AccessControl(groups, lists, defaults, enabled)


#: No file: everything is permitted to every authenticated user.
OPEN = AccessControl({}, [], enabled=False)
