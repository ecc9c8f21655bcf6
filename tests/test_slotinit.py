"""fast_init: the same instances as the __init__ dataclasses writes, and the same refusals."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.codec import EditEntry
from natmig.model import FIELD_NAMES, NatSession
from natmig.slotinit import fast_init

from .strategies import sessions


def _plain(cls: type) -> type:
    """The same dataclass as ``cls`` (frozen, slots) with the __init__ dataclasses writes."""
    spec = [(f.name, f.type, field(default=f.default) if f.default is not dataclasses.MISSING else field()) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"Plain{cls.__name__}", spec, frozen=True, slots=True)


PlainSession = _plain(NatSession)
PlainEntry = _plain(EditEntry)


def _values(obj: Any) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


def test_the_classes_have_the_fast_init() -> None:
    assert NatSession.__init__.__code__.co_filename == "<fast_init of NatSession>"
    assert EditEntry.__init__.__code__.co_filename == "<fast_init of EditEntry>"


@settings(max_examples=200)
@given(sessions(), st.integers(0, len(FIELD_NAMES)), st.booleans())
def test_natsession_same_as_dataclass_init(s: NatSession, given_n: int, by_keyword: bool) -> None:
    # The first fields as given, the rest left to their defaults (where they have one).
    values = _values(s)
    n = max(given_n, 7)  # the first seven fields have no default
    if by_keyword:
        kw = dict(zip(FIELD_NAMES[:n], values[:n]))
        fast, plain = NatSession(**kw), PlainSession(**kw)
    else:
        fast, plain = NatSession(*values[:n]), PlainSession(*values[:n])
    assert _values(fast) == _values(plain)
    assert fast == NatSession(*_values(plain)) and hash(fast) == hash(NatSession(*_values(plain)))


def test_defaults_and_refusals_match() -> None:
    key = ("TCP", "10.0.0.1", 1234, "203.0.113.1", 443)
    assert _values(NatSession(*key, "198.51.100.1", 20000)) == _values(PlainSession(*key, "198.51.100.1", 20000))
    for cls in (NatSession, PlainSession):
        with pytest.raises(TypeError):
            cls(*key)  # translated_address and translated_port missing
        with pytest.raises(TypeError):
            cls(*key, "198.51.100.1", 20000, colour="red")
        with pytest.raises(TypeError):
            cls(*key, "198.51.100.1", 20000, "ESTABLISHED", 1, True, 0, "one too many")
        with pytest.raises(TypeError):
            cls(*key, "198.51.100.1", 20000, protocol="UDP")  # given twice
    e, p = EditEntry("merge", key, {"mark": 1}), PlainEntry("merge", key, {"mark": 1})
    assert _values(e) == _values(p)
    with pytest.raises(TypeError):
        EditEntry("merge", key)


def test_still_frozen_and_a_normal_instance() -> None:
    s = NatSession("UDP", "10.0.0.2", 53, "203.0.113.2", 53, "198.51.100.1", 30000, None, 30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mark = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(s)) == s
    assert copy.deepcopy(s) == s
    assert dataclasses.replace(s, mark=7) == NatSession("UDP", "10.0.0.2", 53, "203.0.113.2", 53, "198.51.100.1", 30000, None, 30, False, 7)
    assert repr(s).startswith("NatSession(protocol='UDP'")


def test_refuses_what_it_cannot_copy() -> None:
    @dataclass
    class Mutable:
        a: int

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (Mutable, Factory, Post):
        with pytest.raises(TypeError):
            fast_init(cls)
