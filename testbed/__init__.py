"""natmig testbed: the emulated network (hosts and NAT nodes in namespaces, a private Open vSwitch).

Modules: :mod:`.topology` (the topology file and its validation), :mod:`.flows`
(the OpenFlow graph, computed without a switch), :mod:`.ovs` (private OVS
daemons and ovs-ofctl), :mod:`.mgmt` (sockets into the management network),
:mod:`.bed` (:class:`~natmig.testbed.bed.Testbed`: up/down/status/point_to),
:mod:`.cli` (``natmig testbed``).  See docs/testbed.md.
"""
