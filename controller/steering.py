"""The switch: which NAT the Open vSwitch bridge sends traffic through.

:class:`Steering` is the small interface the migration uses; the rules
themselves are computed by :func:`natmig.controller.plan.steering_flows` and
applied here as one ``ovs-ofctl --bundle`` transaction (:mod:`natmig.ofctl`;
atomic: no packet sees one direction moved and the other not).  :class:`TestbedSteering`
delegates to an embedded testbed, which knows its own rules.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

from ..errors import ControllerError
from ..netns import CommandError
from ..ofctl import Ofctl
from .plan import SwitchLayout, nats_in_flows, static_flows, steering_flows


class SteeringError(ControllerError):
    """The bridge could not be read or changed."""


class Steering(Protocol):
    """Moves both directions of traffic to a named NAT in one atomic change."""

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


class TestbedSteering:
    """Steering through an embedded testbed's own ``point_to``/``active_nat``."""

    __test__ = False

    def __init__(self, testbed: Any) -> None:
        self.tb = testbed

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
            return self.tb.active_nat()
        except Exception as e:
            raise SteeringError(f"testbed could not tell the active NAT: {e}") from e


def steering_from_spec(spec: Any) -> Steering:
    """The steering an inventory's ``[switch]`` describes (a bridge, or an embedded testbed)."""
    if spec.testbed:
        from ..testbed.bed import Testbed

        try:
            return TestbedSteering(Testbed.attach(spec.testbed))
        except Exception as e:
            raise SteeringError(f"switch.testbed {spec.testbed}: {e}") from e
    return OvsSteering(spec.layout, spec.ovs_rundir, spec.netns)
