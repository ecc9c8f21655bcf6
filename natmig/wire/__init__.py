"""natmig's wire layer: every reader, writer and slicer of NETCONF payloads that the codec's documents do not cover.

Where each byte-level format lives (one home each):

- :mod:`.state`: any state module's entries, natmig-state's state-control,
  state-statistics and state-change, read and written for the generic engine
  and the state agents;
- :mod:`.natedit`: the nat-session list and nat-control as the controller
  writes them into edit-config (entries with their operations, removals);
- :mod:`.natreply`: a get-config reply of the nat-session list kept as text,
  checked and decoded a slice at a time;
- :mod:`.nattext`: that text forwarded to another node without decoding it;
- :mod:`natmig.codec`: nat-session documents themselves (decode and encode,
  every leaf validated by the compiled schema);
- :mod:`natmig.framing`: RFC 6242 framing of whole messages.

- :mod:`.natread`: the agent's reader of messages: bytes to an element
  tree, and a large edit-config of nat-session entries to a decoded
  :class:`~.problems.EditRequest` (canonical fast path, batches);
- :mod:`.problems`: what a refused request is (one problem per rpc-error)
  and what a decoded edit-config is: the seam between reader and datastore;
- :mod:`.xmlbounds`: how large a message's tree may grow, counted before
  lxml builds it;
- :mod:`.reply`: rpc-reply and rpc-error as bytes (the one writer of
  rpc-errors: the NAT agent, the state agent and the controller's
  northbound);
- :mod:`.natwrite`: the nat-session list and nat-control in the agent's
  get and get-config replies (with-defaults modes).
"""
