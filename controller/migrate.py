"""The migration: move a NAT's live sessions from a source agent to a target agent.

Phases (each timed with :func:`time.perf_counter`, see :mod:`.report`):

``preflight``
    Open NETCONF sessions to both agents (host keys checked), check they
    announce the same nat-session revision, then read at once the target's
    table and admission, the source's admission and the switch's active NAT,
    and subscribe to the source's ``nat-session-event`` notifications.
``copy``
    get-config the source, plan (the target must be idle or compatible), and
    edit-config the snapshot into the target's candidate and commit it.
    Into an idle target the source's entries are forwarded as the text it
    sent, undecoded (see :mod:`natmig.wire.nattext`).
``catch-up``
    Write into the target what the source's events changed during the copy
    (the source still serving), then close admission on the target (a packet of an unknown session must never
    create a mapping there) and on the source (it stops creating sessions;
    established ones keep flowing through it), wait until the source's event
    stream is quiet, and write what the events changed since into the
    target.  From here until the switch the source's table cannot
    grow, so the target holds every session the source has.
``switch``
    One atomic OpenFlow bundle moves both directions to the target.
``verify``
    Compare the two nodes' digests of their kernel tables (the source is
    frozen and carries no traffic, so its table is the table at the switch):
    equal, the target holds every source session with the same public
    address and port.  Otherwise compare the two nodes' digests per key
    range and read only the sessions of the ranges that differ
    (:mod:`.rangecheck`), or, when a node cannot or most of the table
    differs, read and compare the tables; a session an
    event did not bring (a late notification) is written now, before the
    target admits new sessions, so it can never be re-mapped.
``admit``
    Open admission on the target.
``retire``
    Remove the source's sessions and reopen its admission (``delete``),
    only reopen it (``keep``), or stop the node (``stop``).

Why the source is frozen before the switch: a session created on the source
after the copy and reaching the target before its state would get a new
mapping on the target (or, for a reply from outside, a reset from the
target's own stack).  Freezing the source makes its table final before
traffic moves, so no such session exists; the price is that a brand-new
connection attempted during the catch-up has its first packet dropped and
retransmitted (TCP), never an existing flow.

Failure handling: before the switch, traffic stays on the source, the
sessions this migration added to the target are removed and both
admissions are restored.  After the switch, when catch-up or verification
fails, traffic is pointed back to the source (which still holds every
session: nothing is retired before verification) and the target is cleaned
up the same way.  The report names the failed phase and each NAT's state.

Where each part lives: every phase is an object (:class:`~.migcontext.MigrationPhase`,
its ``name`` and the capabilities it ``needs`` declared) in
:mod:`.migpreflight`, :mod:`.migcopy` (the copy strategies:
:mod:`.migcopytext`, :mod:`.migstrategy`), :mod:`.migcatchup`,
:mod:`.migverify` and :mod:`.migfinish` (switch, admit, retire); they share
one :class:`~.migcontext.Context`.  The rollback is :mod:`.migrollback`, the
report's read-back :mod:`.migoutcome`; :class:`Migration` here runs them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .. import netns
from ..errors import ControllerError, NatmigError
from .migcatchup import CatchUp
from .migcontext import RETIRE_MODES, VERIFY_SOURCE, WRITABLE_RUNNING, Context, Endpoint, MigrateOptions, MigrationPhase
from .migcopy import Copy
from .migfinish import Admit, Retire, Switch
from .migoutcome import describe_success, read_back
from .migpreflight import Preflight
from .migrollback import recover
from .migverify import Verify, ran_out
from .nodeproto import Node
from .plan import PlanError
from .reach import netns_hint, route_error
from .report import MigrationReport, PhaseClock, PhaseTiming
from .steering import Steering
from .txn import already_pending, persist_token

__all__ = ["RETIRE_MODES", "VERIFY_SOURCE", "WRITABLE_RUNNING", "Endpoint", "MigrateOptions", "Migration", "MigrationError", "endpoint_from_spec", "migrate", "phases", "ran_out"]

log = logging.getLogger(__name__)


class MigrationError(ControllerError):
    """A migration failed; ``report`` says which phase and where each NAT was left."""

    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        states = "; ".join(f"{n}: {s}" for n, s in report.node_state.items())
        super().__init__(
            f"migration {report.source} -> {report.target} failed in phase {report.failed_phase}: {report.error}. "
            f"Traffic on {report.traffic_on}. {states}"
        )


def phases(opt: MigrateOptions) -> list[MigrationPhase]:
    """The phases of a migration with ``opt``, in order (copy, catch-up and verify only when it copies state)."""
    rest: list[MigrationPhase] = [Copy(), CatchUp()] if opt.copy_state else []
    rest += [Switch()]
    if opt.copy_state:
        rest += [Verify()]
    rest += [Admit(), Retire()]
    # Preflight checks both agents for what it and every later phase needs.
    return [Preflight(rest), *rest]


class Migration:
    """One migration of ``source`` to ``target`` through ``steering``; call :meth:`run`.

    The driver: it runs :attr:`phases` in order on one :class:`~.migcontext.Context`,
    rolls back on a failure (:func:`~.migrollback.recover`), reads both nodes
    and the switch back into the report (:mod:`.migoutcome`) and closes the sessions.
    """

    def __init__(
        self,
        source: Endpoint,
        target: Endpoint,
        steering: Steering,
        options: MigrateOptions | None = None,
        on_phase: Callable[[PhaseTiming], None] | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.steering = steering
        self.opt = options or MigrateOptions()
        self.report = MigrationReport(source.name, target.name)
        self.clock = PhaseClock(self.report, on_phase)
        self.phases = phases(self.opt)
        self.ctx = Context(source, target, steering, self.opt, self.report, token=persist_token(source.name, target.name))

    # --------------------------------------------------------------- driver

    def run(self) -> MigrationReport:
        """Run every phase; on failure roll back as the module docstring says.

        Returns the report; ``report.ok`` tells success.  Step failures never
        raise out of here (see :func:`migrate` for the raising form).
        """
        try:
            for phase in self.phases:
                with self.clock.phase(phase.name) as ph:
                    phase.run(self.ctx, ph)
            self.report.ok = True
        except (NatmigError, OSError, TimeoutError) as e:
            self.report.error = str(e)
            log.warning("migration failed in %s: %s", self.report.failed_phase, e)
            if already_pending(e):
                self.report.notes.append(
                    f"a confirmed commit of an interrupted migration is still pending there (its agent rolls it back by itself "
                    f"within its confirm-timeout): `{self.opt.recover_hint}` settles it now")
            if isinstance(e, PlanError):
                self.report.notes.append(
                    f"the target holds sessions that conflict with the source's: `{self.opt.recover_hint}` removes a copy an "
                    "interrupted migration left there; sessions of the target's own must be removed from it, or choose another target")
            recover(self.ctx)
        except BaseException as e:  # Ctrl-C or a bug: still leave traffic where it works
            self.report.error = f"{type(e).__name__}: {e}"
            recover(self.ctx)
            read_back(self.ctx)
            self._close()
            raise
        if self.report.ok:
            describe_success(self.ctx)
        try:
            read_back(self.ctx)
        finally:
            self._close()
        return self.report

    def _close(self) -> None:
        for lock in self.ctx.locks:
            if lock.node.connected:
                lock.release()
        self.ctx.locks = []
        for node in (self.ctx.events_node, self.ctx.src, self.ctx.tgt):
            if node is not None:
                try:
                    node.close()
                except Exception:  # closing a dead session must not hide the real outcome
                    pass


def migrate(source: Endpoint, target: Endpoint, steering: Steering, options: MigrateOptions | None = None, on_phase: Callable[[PhaseTiming], None] | None = None) -> MigrationReport:
    """Run a migration; raise :class:`MigrationError` (carrying the report) when it fails."""
    report = Migration(source, target, steering, options, on_phase).run()
    if not report.ok:
        raise MigrationError(report)
    return report


# ------------------------------------------------------------ from inventory


def endpoint_from_spec(spec: Any, timeout: float = 30.0) -> Endpoint:
    """An :class:`Endpoint` for an inventory :class:`~natmig.controller.inventory.AgentSpec`.

    Host keys are always checked (against ``spec.known_hosts``); the
    connection is opened from ``spec.netns`` when given.
    """
    from .netconf import AuthenticationRefused, ConnectError, NodeClient

    def open_node() -> Node:
        def connect() -> Node:
            node = NodeClient.connect(
                spec.host, spec.port, spec.username, password=spec.secret(), key_filename=spec.key,
                known_hosts=spec.known_hosts, hostkey_verify=True, timeout=timeout,
            )
            node.name = spec.name
            return node
        if spec.netns:
            try:
                return netns.call_in(spec.netns, connect)
            except netns.NetnsError as e:
                raise ConnectError(f"agents.{spec.name}.netns: {e} (ip netns list shows those that exist)") from e
        # Without netns the connection leaves from this namespace: refuse at
        # once when it has no route, and name the field either way.
        why = route_error(spec.host, spec.port)
        if why is not None:
            raise ConnectError(f"{spec.host}:{spec.port}: {why}; {netns_hint(spec.name)}")
        try:
            return connect()
        except AuthenticationRefused:
            raise  # reached: the namespace was right
        except ConnectError as e:
            raise ConnectError(f"{e}; {netns_hint(spec.name)}") from e

    stop = None
    if spec.stop_command:
        def stop() -> None:
            try:
                netns.run(spec.stop_command)
            except netns.CommandError as e:
                raise ControllerError(f"stopping {spec.name}: {e}") from e
    return Endpoint(spec.name, open_node, public=spec.public_addresses, stop=stop)
