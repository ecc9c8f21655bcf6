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

The agent's reader of incoming edit-config (canonical fast path and
batches) is still in :mod:`natmig.agent.rpc`.
"""
