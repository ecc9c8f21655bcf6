"""The switch: which NAT the Open vSwitch bridge sends traffic through.

:class:`Steering` is the small interface the migration uses; the rules
themselves are computed by :func:`natmig.controller.plan.steering_flows` and
applied here as one ``ovs-ofctl --bundle`` transaction (:mod:`natmig.ofctl`;
atomic: no packet sees one direction moved and the other not).  :class:`TestbedSteering`
delegates to an embedded testbed, which knows its own rules.
:class:`FabricSteering` steers several switches joined by tunnels (NATs on
several machines): one bundle per switch, in the make-before-break order
:func:`natmig.controller.fabric.plan_move` gives, undone in reverse when a
step fails; callers see the same two methods.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Protocol

from ..errors import ControllerError, NatmigError
from ..netns import CommandError
from ..ofctl import Ofctl
from .fabric import Fabric, Step, plan_move, rollback, routes
from .plan import PlanError, SwitchLayout, nats_in_flows, static_flows, steering_flows


class SteeringError(ControllerError):
    """The bridge could not be read or changed."""


class SwitchesDisagree(SteeringError):
    """Several switches send traffic to different NATs: a move across switches was interrupted between two of them."""


class Steering(Protocol):
    """Moves both directions of traffic to a named NAT: in one atomic change on one switch; across several, make-before-break (:class:`FabricSteering`)."""

    def point_to(self, nat: str) -> None:
        """Send traffic through ``nat`` (atomic)."""

    def active(self) -> str | None:
        """The NAT traffic goes through now, None when unknown."""


class OvsSteering:
    """Steering over ``ovs-ofctl`` of a bridge described by a :class:`SwitchLayout`.

    ``rundir`` is the OVS_RUNDIR of the daemons that own the bridge (a
    private Open vSwitch); ``netns`` the namespace to run ovs-ofctl in, None
    for the current one.
    """

    def __init__(self, layout: SwitchLayout, rundir: str | None = None, netns_name: str | None = None) -> None:
        self.layout = layout
        self.rundir = rundir
        self.netns = netns_name
        self.ofctl = Ofctl(layout.bridge, rundir, netns_name)

    @contextmanager
    def _bridge(self) -> Iterator[None]:
        try:
            yield
        except CommandError as e:
            raise SteeringError(f"bridge {self.layout.bridge}: {e}") from e

    def install(self, nat: str) -> None:
        """Install the static return rules of every NAT and point traffic at ``nat``, in one bundle."""
        with self._bridge():
            self.ofctl.add_flows(static_flows(self.layout) + steering_flows(self.layout, nat))

    def point_to(self, nat: str) -> None:
        """Replace the two steering rules so that both directions go through ``nat`` (one bundle)."""
        with self._bridge():
            self.ofctl.add_flows(steering_flows(self.layout, nat))

    def active(self) -> str | None:
        """The NAT the client's traffic is sent to, read back from the bridge."""
        with self._bridge():
            dump = self.ofctl.dump_flows(f"in_port={self.layout.client_port}")
        return next(iter(nats_in_flows(self.layout, dump)), None)


class FabricSteering:
    """Steering over the switches of several machines (``switches``: machine -> its bridge's :class:`Ofctl`).

    :meth:`point_to` applies the planned steps one bundle per switch; each
    switch's change is atomic, the whole is make-before-break (see
    :mod:`.fabric`).  When a step fails, the steps done are undone in
    reverse before :class:`SteeringError` is raised.  ``on_step`` is called
    after each step applied (progress, or a fault test's hook); ``steps``
    holds what the last :meth:`point_to` applied, with seconds each.
    ``settle`` (by machine): called after each bundle on that switch, to
    return only once the change is in effect in its datapath (cached flows
    of the old rules revalidated): make-before-break needs each step in
    effect before the next.

    With several NAT instances (pairs of networks), ``instance`` names a NAT
    of the one this steering reads and moves: :meth:`active` is that
    instance's active NAT, and :meth:`point_to` rewrites only its rules, so
    moves of different instances may run at once on the same switches.
    """

    def __init__(self, fabric: Fabric, switches: Mapping[str, Ofctl], on_step: Callable[[Step], None] | None = None,
                 settle: Mapping[str, Callable[[], None]] | None = None, instance: str | None = None) -> None:
        self.fabric = fabric
        self.switches = dict(switches)
        self.on_step = on_step
        self.settle = dict(settle or {})
        self.steps: list[tuple[Step, float]] = []
        self.instance = instance

    def _apply(self, step: Step) -> None:
        try:
            self.switches[step.switch].add_flows(step.flows)
            wait = self.settle.get(step.switch)
            if wait is not None:
                wait()
        except NatmigError as e:  # ovs-ofctl's CommandError, or the settle's own layer
            raise SteeringError(f"switch of machine {step.switch} ({step.stage}): {e}") from e

    def point_to(self, nat: str) -> None:
        """Move traffic of ``nat``'s instance to ``nat``: prepare its machine, move each switch's ingress, retire the old machine."""
        try:
            frm = self._active(nat)
        except SteeringError:
            frm = None  # switches disagree or one is unreadable: rewrite every steering rule
        self.steps = []
        done: list[Step] = []
        for step in plan_move(self.fabric, frm, nat):
            t0 = time.perf_counter()
            try:
                self._apply(step)
            except SteeringError as e:
                undone, failed = [], []
                for back in rollback(done):
                    try:
                        self._apply(back)
                        undone.append(f"{back.stage} on {back.switch}")
                    except SteeringError as e2:
                        failed.append(str(e2))
                what = f"; undone: {', '.join(undone)}" if undone else "; nothing to undo"
                raise SteeringError(f"moving traffic to {nat}: {e}{what}" + (f"; could NOT undo: {'; '.join(failed)}" if failed else "")) from e
            done.append(step)
            self.steps.append((step, time.perf_counter() - t0))
            if self.on_step is not None:
                self.on_step(step)

    def routes(self, of: str | None = None) -> dict[tuple[str, str], str | None]:
        """(machine, network) -> the NAT those hosts' traffic reaches, read back from every switch (``of``: that NAT's instance only)."""
        dumps = {}
        for machine, ofctl in self.switches.items():
            try:
                dumps[machine] = ofctl.dump_flows()
            except CommandError as e:
                raise SteeringError(f"switch of machine {machine}: {e}") from e
        try:
            return routes(self.fabric, dumps, of)
        except PlanError as e:
            raise SteeringError(str(e)) from e

    def active(self) -> str | None:
        """The NAT every switch sends its hosts' traffic to (of :attr:`instance`), read back; :class:`SteeringError` when they disagree."""
        if self.instance is None and len({self.fabric.pair(n) for m in self.fabric.machines.values() for n in m.nats}) > 1:
            raise SteeringError("several NAT instances (network pairs) share these switches: each has its own active NAT; name the instance")
        return self._active(self.instance)

    def actives(self) -> dict[tuple[str, str], str | None]:
        """Each instance's (network pair's) active NAT, read back from every switch; None where its switches disagree or send nowhere."""
        out: dict[tuple[str, str], str | None] = {}
        for m in self.fabric.machines.values():
            for nat in m.nats:
                pair = self.fabric.pair(nat)
                if pair not in out:
                    try:
                        out[pair] = self._active(nat)
                    except SwitchesDisagree:
                        out[pair] = None
        return out

    def _active(self, of: str | None) -> str | None:
        r = self.routes(of)
        reached = set(r.values())
        if len(reached) > 1:
            detail = ", ".join(f"{net} hosts on {m} -> {nat or 'nowhere'}" for (m, net), nat in r.items())
            raise SwitchesDisagree(f"the switches disagree: {detail}")
        return next(iter(reached), None)


class TestbedSteering:
    """Steering through an embedded testbed's own ``point_to``/``active_nat``."""

    __test__ = False

    def __init__(self, testbed: Any, instance: str | None = None) -> None:
        self.tb = testbed
        #: with several NAT instances, a NAT of the one this steering reads (see :class:`FabricSteering`)
        self.instance = instance

    def point_to(self, nat: str) -> None:
        """Send traffic through ``nat`` with the testbed's atomic bundle."""
        try:
            self.tb.point_to(nat)
        except ControllerError:
            raise
        except Exception as e:  # the testbed raises its own error layer
            raise SteeringError(f"testbed could not point traffic to {nat}: {e}") from e

    def active(self) -> str | None:
        """The testbed's active NAT."""
        try:
            return self.tb.active_nat(self.instance) if self.instance is not None else self.tb.active_nat()
        except Exception as e:
            raise SteeringError(f"testbed could not tell the active NAT: {e}") from e


def steering_from_spec(spec: Any, instance: str | None = None) -> Steering:
    """The steering an inventory's ``[switch]`` describes (a bridge, or an embedded testbed); ``instance``: a NAT of the instance it moves."""
    if spec.testbed:
        from ..testbed.bed import Testbed

        try:
            return TestbedSteering(Testbed.attach(spec.testbed), instance)
        except Exception as e:
            raise SteeringError(f"switch.testbed {spec.testbed}: {e}") from e
    return OvsSteering(spec.layout, spec.ovs_rundir, spec.netns)
