"""What an edit-config changes, planned without applying anything (RFC 6241 7.2).

:func:`plan_edit` turns a decoded :class:`~natmig.wire.problems.EditRequest`
into a :class:`Plan`: entries to write, keys to delete, nat-control, and
the problems found.  The datastores (:mod:`.datastore`) apply plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..codec import Codec
from ..editentry import EditEntry
from ..errors import CodecError
from ..model import FIELD_NAMES, NatSession, SessionKey, format_key
from ..wire.problems import EditRequest, Problem, problems_of_codec

CONTROL_DEFAULTS = {"admit-new-sessions": True}


@dataclass
class Plan:
    """What an edit changes: entries to write (created or replaced) and keys to delete."""

    upserts: dict[SessionKey, NatSession] = field(default_factory=dict)
    deletes: set[SessionKey] = field(default_factory=set)
    control: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)


def _values_of(s: NatSession) -> dict[str, Any]:
    return {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None}


def _complete(codec: Codec, values: dict[str, Any], problems: list[Problem]) -> NatSession | None:
    try:
        return codec.complete(values)
    except CodecError as e:
        problems.extend(problems_of_codec(e))
        return None


def _op_merge(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    values = {**_values_of(old), **e.values} if old is not None else e.values
    s = _complete(codec, values, plan.problems)
    if s is not None and s != old:
        plan.upserts[e.key] = s


def _op_replace(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    s = _complete(codec, e.values, plan.problems)
    if s is not None and s != old:
        plan.upserts[e.key] = s


def _op_create(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    if old is not None:
        plan.problems.append(Problem("data-exists", "the entry already exists", format_key(e.key)))
        return
    _op_replace(codec, e, old, plan)


def _op_delete(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    if old is None:
        plan.problems.append(Problem("data-missing", "the entry does not exist", format_key(e.key)))
        return
    plan.deletes.add(e.key)


def _op_remove(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    if old is not None:
        plan.deletes.add(e.key)


def _op_none(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    # default-operation none: an entry without its own operation only navigates,
    # so it must exist (RFC 6241 7.2).
    if old is None:
        plan.problems.append(Problem("data-missing", "the entry does not exist (default-operation none)", format_key(e.key)))


#: edit-config operation -> how one list entry is planned (RFC 6241 7.2).
ENTRY_OPERATIONS: dict[str, Callable[[Codec, EditEntry, NatSession | None, Plan], None]] = {
    "merge": _op_merge,
    "replace": _op_replace,
    "create": _op_create,
    "delete": _op_delete,
    "remove": _op_remove,
    "none": _op_none,
}


#: Operations that write an entry the datastore does not hold yet.
_WRITES = frozenset({"merge", "replace", "create"})


def plan_edit(codec: Codec, current: dict[SessionKey, NatSession], control: dict[str, Any] | None, req: EditRequest, default_operation: str = "merge") -> Plan:
    """What ``req`` changes in a datastore holding ``current`` and ``control``; problems included.

    Pure: nothing is applied.  ``current`` must hold every entry the request
    names (running: the ones it names are looked up), or the whole list for
    an operation on the list or default-operation replace.  ``control`` may
    be None when the request does not touch nat-control.  With
    default-operation replace the request's entries become the whole list
    (top-level nodes absent from the request, such as nat-control, are left
    as they are).
    """
    plan = Plan()
    if req.list_operation == "delete" and not current:
        plan.problems.append(Problem("data-missing", "the list has no entries to delete", "nat-session"))
    if req.list_operation in ("delete", "remove"):
        plan.deletes.update(current)
    get = current.get
    upserts = plan.upserts
    complete = codec.complete
    run = req.run
    whole = run is not None and (run.operation or default_operation) in _WRITES and current.keys().isdisjoint(run.keys)
    if whole:
        # A copy's slice: every entry new (so none among the deletes either),
        # each completed by its reader: all the loop below would do with them.
        assert run is not None
        upserts.update(zip(run.keys, run.sessions))
    entries: list[EditEntry] = [] if whole else req.entries
    for e in entries:
        op = e.operation or default_operation
        key = e.key
        if plan.deletes and key in plan.deletes and op not in ("delete", "remove"):
            # Deleting the whole list and writing an entry of it in one request.
            plan.deletes.discard(key)
            ENTRY_OPERATIONS["replace"](codec, e, None, plan)
            continue
        old = get(key)
        if old is None and op in _WRITES:
            # The common case (a table written into a node that lacks it):
            # what _op_merge, _op_replace and _op_create all do for a new entry.
            try:
                upserts[key] = complete(e.values)
            except CodecError as err:
                plan.problems.extend(problems_of_codec(err))
            continue
        ENTRY_OPERATIONS[op](codec, e, old, plan)
    if default_operation == "replace":
        named = set(run.keys) if whole and run is not None else {e.key for e in entries}
        plan.deletes.update(k for k in current if k not in named)
    if _touches_control(req):
        assert control is not None, "nat-control is edited: its current values are needed"
        cop = req.control_operation or default_operation
        if cop in ("delete", "remove"):
            if cop == "delete" and control == CONTROL_DEFAULTS:
                plan.problems.append(Problem("data-missing", "nat-control holds only defaults", "nat-control"))
            new = dict(CONTROL_DEFAULTS)
        elif cop in ("replace", "create"):
            new = {**CONTROL_DEFAULTS, **(req.control or {})}
        elif cop == "none":
            new = control
        else:
            new = {**control, **(req.control or {})}
        if new != control:
            plan.control = new
    return plan


def _touches_control(req: EditRequest) -> bool:
    return req.control is not None or req.control_operation is not None


def provider_problem(key: SessionKey, why: str) -> Problem:
    """A provider's refusal of one entry (see check_batch) as a NETCONF problem."""
    if "already used" in why:
        return Problem("operation-failed", why, format_key(key), "translated_port", app_tag="data-not-unique")
    if "not an address of this node" in why:
        return Problem("invalid-value", why, format_key(key), "translated_address")
    return Problem("operation-failed", why, format_key(key))
