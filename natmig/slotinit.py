"""A faster ``__init__`` for the frozen slots dataclasses made once per session (NatSession, EditEntry).

The ``__init__`` that dataclasses writes for a frozen class sets each field
with ``object.__setattr__(self, name, value)``, which looks the name up
again on every call: building a NatSession of eleven fields took ~3.7 us,
~0.37 s of a target agent's CPU for the 100,000 sessions of a migration's
copy (a few per session more where tables are read).  The one written here
sets each slot through its member descriptor, fetched once: ~1.3 us, the
same instance (tests/test_slotinit.py compares both inits field by field,
positional and by keyword, and their refusals).  The class stays frozen:
assignment still raises FrozenInstanceError; only ``__init__`` changes.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Give the frozen slots dataclass ``cls`` an ``__init__`` that sets its slots directly; ``cls`` itself.

    Only for what dataclasses' own init does with plain fields: every field
    in ``__init__``, defaults but no default factory, no ``__post_init__``
    (anything else raises TypeError at import, not a silent difference).
    """
    params = getattr(cls, "__dataclass_params__", None)
    if not is_dataclass(cls) or params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__qualname__}: fast_init is for frozen dataclasses with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__qualname__}: fast_init does not run __post_init__")
    scope: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for i, f in enumerate(fields(cls)):
        if not f.init or f.kw_only or f.default_factory is not MISSING:
            raise TypeError(f"{cls.__qualname__}.{f.name}: fast_init takes fields with plain defaults only")
        if f.default is MISSING:
            args.append(f.name)
        else:
            scope[f"_default{i}"] = f.default
            args.append(f"{f.name}=_default{i}")
        # The slot's member descriptor: its __set__ stores the value, past the class's frozen __setattr__.
        scope[f"_set{i}"] = cls.__dict__[f.name].__set__
        body.append(f"    _set{i}(self, {f.name})")
    source = f"def __init__(self, {', '.join(args)}) -> None:\n" + ("\n".join(body) or "    pass") + "\n"
    exec(compile(source, f"<fast_init of {cls.__qualname__}>", "exec"), scope)  # noqa: S102 -- source built from field names above
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    setattr(cls, "__init__", init)
    return cls
