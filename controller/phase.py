"""What every migration's phases and copy strategies declare, whatever they move.

Both migrations are sequences of phase objects: the generic engine's
(:mod:`.engine`) and the NAT's (:mod:`.migrate`).  Each phase has a
``name`` (what its report and timings say) and declares in ``needs`` the
NETCONF capabilities it needs from both agents; those are checked against
the agents' hellos before anything changes (:func:`missing_needs`), never
probed.  How a phase runs is each migration's own (their contexts differ):
the subclasses add ``run``.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Iterable


class Phase(abc.ABC):
    """One step of a migration; ``needs``: capabilities both agents must announce for it."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()


class CopyStrategy(abc.ABC):
    """One way of getting the source's state into the target's candidate; ``name`` says which in reports."""

    name: ClassVar[str]


def missing(needs: Iterable[str], capabilities: Iterable[str]) -> list[str]:
    """The capabilities of ``needs`` that are not among ``capabilities``, by short name (``candidate``), sorted."""
    have = set(capabilities)
    return sorted({c.rsplit(":", 2)[-2] for c in needs if c not in have})


def missing_needs(phases: Iterable[Phase], capabilities: Iterable[str]) -> list[str]:
    """The capabilities the phases declare that are not among ``capabilities``, by short name (``candidate``), sorted."""
    return missing({c for p in phases for c in p.needs}, capabilities)
