"""edit-config and validate on the datastores, and the checks of what an edit writes into the candidate.

Running's entries are checked by the provider against its live table; the
candidate's against the candidate, by its reply-tuple index when it has one.
"""

from __future__ import annotations

import logging

from ..model import REPLY_KEY_OF, NatSession, SessionKey, format_key
from ..wire.problems import DatastoreError, EditRequest
from .datastorebase import DatastoreBase, _reading_table
from .editplan import CONTROL_DEFAULTS, Plan, _touches_control, plan_edit
from .provider import ReplyKey, check_batch, check_batch_by_holders, yields_port

log = logging.getLogger(__name__)


class DatastoreEdits(DatastoreBase):
    """edit-config into running or the candidate, all or nothing, and <validate>."""

    def edit(self, target: str, req: EditRequest, sid: int, default_operation: str = "merge", test_option: str = "test-then-set", error_option: str = "stop-on-error") -> Plan:
        """Apply an edit-config to ``target``, all or nothing (continue-on-error: the good part).

        Returns the applied plan; raises :class:`DatastoreError` with every
        problem.  ``req`` is consumed (its entries are cleared).
        """
        self._check_name(target)
        with self._mutex:
            self._check_write(target, sid)
            # A request that names no session (nat-control only, as a
            # migration sends four times) needs no read of the table: at
            # 100k sessions that read is ~1 s of a node's time.  Into the
            # candidate, it leaves the candidate's sessions uncopied.
            needs_table = bool(req.entry_count) or req.list_operation is not None
            if target == "candidate":
                self._ensure_candidate(sessions=needs_table)
                current = self._cand if needs_table and self._cand is not None else {}
                control = self._cand_control
                assert control is not None
            else:
                current = self._running_current(req, default_operation) if needs_table else {}
                # Read (an nft call) only when the request touches nat-control.
                control = self.running_control() if _touches_control(req) else None
            plan = plan_edit(self.codec, current, control, req, default_operation)
            # The request is consumed: its per-entry dicts (~60 MB at 100k
            # entries) are freed before the provider builds its own batch.
            req.clear_entries()
            if target == "candidate":
                self._check_against(plan, current)
            elif plan.deletes or plan.control is not None or error_option == "continue-on-error" or test_option == "test-only":
                # Steps before the apply (deletes, nat-control) could not be
                # undone by it, and test-only and continue-on-error need every
                # problem first: the provider checks the entries against its
                # live table, reading only what they name.
                self._check_running(plan)
            # else: a plain write of entries is checked by the provider's own
            # all-or-nothing apply (the same rule), not twice.
            if plan.problems and error_option != "continue-on-error":
                raise DatastoreError(plan.problems)
            if test_option == "test-only":
                if plan.problems:
                    raise DatastoreError(plan.problems)
                return plan
            if target == "candidate":
                if needs_table:
                    self._index_candidate(plan, current)
                    for k in plan.deletes:
                        current.pop(k, None)
                    current.update(plan.upserts)
                if plan.control is not None:
                    self._cand_control = plan.control
            else:
                self._apply_running(plan, current, control)
            if plan.problems:
                # continue-on-error: the rest was applied; report what was not.
                raise DatastoreError(plan.problems)
            return plan

    def _running_current(self, req: EditRequest, default_operation: str) -> dict[SessionKey, NatSession]:
        """What of running an edit needs to be planned: the entries it names, or the whole list.

        An edit of K entries looks up those K (a catch-up of 100 sessions at
        100k: a few ms, against ~1 s for the table); only an operation on the
        whole list (delete/remove of it, default-operation replace) reads it all.
        """
        if req.list_operation is not None or default_operation == "replace":
            return {s.key: s for s in self._list()}
        with _reading_table():
            return {s.key: s for s in self.provider.lookup(req.keys())}

    def _check_against(self, plan: Plan, current: dict[SessionKey, NatSession]) -> None:
        """Refuse entries the node could not hold on top of ``current`` (the candidate's table): check_batch.

        Against the candidate's reply-tuple index when it has one
        (check_batch_by_holders, the same rule): a migration writes its copy
        in slices, and check_batch over the whole candidate at each slice
        was quadratic (100k in 11 slices: ~260 ms against ~80; 1M in 40: ~10 s).
        """
        if not plan.upserts:
            return
        replies = self._candidate_replies() if current is self._cand else None
        problems = self._clashes(plan, current, replies)
        if problems and self._give_way(plan, problems, current, replies):
            problems = self._clashes(plan, current, replies)
        self._refuse(plan, problems)

    def _clashes(self, plan: Plan, current: dict[SessionKey, NatSession], replies: dict[ReplyKey, SessionKey] | None) -> dict[SessionKey, str]:
        """check_batch of the plan's entries on top of ``current``, by the candidate's reply index when there is one."""
        batch = list(plan.upserts.values())
        owned = self.provider.public_addresses()
        if replies is not None:
            holders = {r: replies[r] for r in filter(replies.__contains__, map(REPLY_KEY_OF, batch))}
            # No reply tuple of the batch held (a copy's slices): only the batch against itself,
            # which check_batch decides by set operations in C when it finds nothing.
            return check_batch_by_holders(batch, holders, owned, plan.deletes) if holders else check_batch(batch, {}, owned)
        base = {k: s for k, s in current.items() if k not in plan.deletes} if plan.deletes else current
        return check_batch(batch, base, owned)

    def _give_way(self, plan: Plan, problems: dict[SessionKey, str], current: dict[SessionKey, NatSession],
                  replies: dict[ReplyKey, SessionKey] | None) -> bool:
        """Settle each public-port clash of the plan where one side is a closed TCP connection as the kernel would: it goes.

        A copy reads the source while it serves, and a dump is no snapshot:
        when the source's NAT gave a closed connection's public port to a
        new one meanwhile (provider.YIELDING_STATES), the read may hold
        both, the closed one read before the kernel killed it (measured: a
        1,000,000-session copy beside 100 new connections a second through
        10,000 ports was refused for two such pairs).  The closed one is
        left out, or taken out of the candidate, and the source's events
        delete it anyway.  Clashes of two live sessions stay refused.
        True when the plan changed (then checked again).
        """
        if replies is None:
            replies = {s.reply_key: k for k, s in current.items()}
        first: dict[ReplyKey, SessionKey] = {}
        changed = False
        for k, s in list(plan.upserts.items()):
            r = s.reply_key
            other = first.setdefault(r, k)
            if other == k and k in problems:
                held = replies.get(r)
                other = held if held is not None and held != k and held not in plan.deletes and held not in plan.upserts else k
            if other == k or k not in problems:
                continue
            o = plan.upserts.get(other) or current[other]
            if yields_port(o):
                if other in plan.upserts:
                    del plan.upserts[other]
                    first[r] = k
                else:
                    plan.deletes.add(other)
                log.info("%s (%s) gives its public port up to %s, as the NAT's kernel does", format_key(other), o.tcp_state, format_key(k))
            elif yields_port(s):
                del plan.upserts[k]
                if first[r] == k:
                    del first[r]  # the port stays ``other``'s, held in the candidate
                log.info("%s (%s) left out: its public port is %s's, as the NAT's kernel does", format_key(k), s.tcp_state, format_key(other))
            else:
                continue
            changed = True
        return changed

    def _candidate_replies(self) -> dict[ReplyKey, SessionKey] | None:
        """The candidate's sessions by reply tuple (made once, then kept by edit); None when two share one.

        check_batch_by_holders equals check_batch on a table whose reply
        tuples are distinct, as a NAT's are; a candidate where they are not
        (taken from a provider that allows it) is checked whole.
        """
        if self._cand_replies is None and self._cand is not None:
            replies = {s.reply_key: k for k, s in self._cand.items()}
            if len(replies) == len(self._cand):
                self._cand_replies = replies
        return self._cand_replies

    def _index_candidate(self, plan: Plan, current: dict[SessionKey, NatSession]) -> None:
        """Keep the candidate's reply-tuple index with an edit that is about to be applied to it."""
        replies = self._cand_replies
        if replies is None or current is not self._cand:
            return
        if not plan.deletes and current.keys().isdisjoint(plan.upserts):
            # New sessions only (a copy's slices): their reply tuples are added at once.
            size = len(replies) + len(plan.upserts)
            replies.update(zip(map(REPLY_KEY_OF, plan.upserts.values()), plan.upserts))
            if len(replies) != size:
                self._cand_replies = None  # two sessions with one reply tuple: check the candidate whole from now on
            return
        for k in (*plan.deletes, *plan.upserts):
            old = current.get(k)
            if old is not None and replies.get(old.reply_key) == k:
                del replies[old.reply_key]
        for k, s in plan.upserts.items():
            if replies.setdefault(s.reply_key, k) != k:
                # Two sessions with one reply tuple (an edit the check let through): check the candidate whole from now on.
                self._cand_replies = None
                return
    def validate(self, source: str | None, req: EditRequest | None = None) -> None:
        """<validate> (RFC 6241 8.6): would ``source``, or the inline config ``req``, be accepted by the node?

        Running is the node's own table and always valid.  The candidate is
        checked as its commit would be (its sessions only once an edit copied
        them; nat-control is always valid); an inline config as an edit that
        replaces the whole list.  Raises :class:`DatastoreError`.
        """
        with self._mutex:
            if req is not None:
                plan = plan_edit(self.codec, {}, dict(CONTROL_DEFAULTS), req, "replace")
                self._check_against(plan, {})
            elif source == "candidate" and self._cand is not None:
                plan = Plan(upserts={k: s for k, s in self._cand.items() if self._cand_base.get(k) != s},
                            deletes={k for k in self._cand_base if k not in self._cand})
                self._check_running(plan)
            else:
                self._check_name(source or "")
                return
            if plan.problems:
                raise DatastoreError(plan.problems)
