"""The agent's config file (TOML): one key per command-line flag, and a flag given on the command line wins.

A key is the flag's name without the dashes, ``_`` for ``-`` (``--max-sessions``
is ``max_sessions``; ``max-sessions`` is accepted too); values have the
flag's type (``public_address`` takes a string or a list).  Which flags
were *given* is recorded while parsing (:func:`track_given`), so that a flag
spelled with its default value still beats the file: comparing with the
default could not tell the two apart.  The flags themselves are defined in
:mod:`.cli` and read from its parser, so a new flag gets its key for free.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from ..errors import UsageError

#: namespace attribute listing the dests of the options given on the command line
GIVEN = "given_options"
#: options that are not settings of the agent
NOT_SETTINGS = ("help", "config", "verbose", "quiet")


class ConfigError(UsageError):
    """The agent's config file is missing, not TOML, or has an unknown key or a bad value (named)."""


class _Given:
    """Mixin for argparse actions: records the action's dest as given (in the namespace attribute ``given_attr``)."""

    dest: str
    given_attr = GIVEN

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        given = getattr(namespace, self.given_attr, None)
        if given is None:
            given = set()
            setattr(namespace, self.given_attr, given)
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]


def track_given(parser: argparse.ArgumentParser, tag: str = "") -> dict[str, argparse.Action]:
    """Make ``parser``'s options record themselves when given; returns them by dest (the config's keys).

    ``tag`` names the set a sub-parser records into: argparse copies a
    sub-parser's values over its parent's, so one shared set would lose the
    parent's entries.
    """
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_SETTINGS or isinstance(action, argparse._SubParsersAction):
            continue
        # A subclass per action class, made once: argparse dispatches on the
        # action object's class, and the option's definition stays untouched.
        action.__class__ = _given_class(type(action), GIVEN + tag)
        if action.required:
            # A required flag may come from the config file instead: resolve()
            # checks it once both are read (argparse would refuse first, and
            # would refuse `natmig agent passwd` too).
            action.required = False
            action.natmig_required = True  # type: ignore[attr-defined]
        options[action.dest] = action
    return options


_CLASSES: dict[tuple[type, str], type] = {}


def _given_class(cls: type, attr: str) -> type:
    if issubclass(cls, _Given):
        cls = cls.__mro__[2]  # the argparse class under _Given
    if (cls, attr) not in _CLASSES:
        _CLASSES[cls, attr] = type(f"Given{cls.__name__.lstrip('_')}", (_Given, cls), {"given_attr": attr})
    return _CLASSES[cls, attr]


def _value(where: str, action: argparse.Action, v: Any) -> Any:
    """``v`` from the file, checked and converted as the flag's own argument would be."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {v!r} is not true or false")
        return v
    if isinstance(action, argparse._AppendAction):
        items = v if isinstance(v, list) else [v]
        return [_scalar(where, action, x) for x in items]
    return _scalar(where, action, v)


def _scalar(where: str, action: argparse.Action, v: Any) -> Any:
    kind = action.type
    if isinstance(v, bool) or isinstance(v, (list, dict)):
        raise ConfigError(f"{where}: {v!r} is not a {getattr(kind, '__name__', 'string')}")
    if kind is int:
        if not isinstance(v, int):
            raise ConfigError(f"{where}: {v!r} is not an integer")
    elif kind is float:
        if not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {v!r} is not a number")
        v = float(v)
    elif not isinstance(v, str):
        raise ConfigError(f"{where}: {v!r} is not a string")
    elif callable(kind):
        try:
            v = kind(v)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from e
    if action.choices is not None and v not in action.choices:
        raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return v


def load(path: str, options: dict[str, argparse.Action]) -> dict[str, Any]:
    """The settings of a config file, by dest, each checked as its flag would be."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"agent config {path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"agent config {path}: not valid TOML: {e}") from e
    out: dict[str, Any] = {}
    for key, v in data.items():
        dest = key.replace("-", "_")
        action = options.get(dest)
        if action is None:
            raise ConfigError(f"agent config {path}: {key}: unknown key (keys: {', '.join(sorted(options))})")
        out[dest] = _value(f"agent config {path}: {key}", action, v)
    return out


def resolve(args: argparse.Namespace, options: dict[str, argparse.Action]) -> argparse.Namespace:
    """``args`` with the config file's settings applied under the flags given on the command line."""
    path = getattr(args, "config", None)
    if path:
        given: set[str] = set().union(*(v for k, v in vars(args).items() if k.startswith(GIVEN)))
        for dest, v in load(path, options).items():
            if dest not in given:
                setattr(args, dest, v)
    for dest, action in options.items():
        if getattr(action, "natmig_required", False) and getattr(args, dest, None) is None:
            raise UsageError(f"{action.option_strings[-1]} is required (on the command line, or as {dest} in the --config file)")
    return args

