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
    Close admission on the target (a packet of an unknown session must never
    create a mapping there) and on the source (it stops creating sessions;
    established ones keep flowing through it), wait until the source's event
    stream is quiet, and write what the events changed since the snapshot
    into the target.  From here until the switch the source's table cannot
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
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, cast

from .. import netns
from ..errors import ControllerError, NatmigError
from ..model import NatSession, SessionKey, key_range, table_digest
from .nodeproto import SESSIONS_AND_ADMISSION, CHUNKS, RANGES, STATISTICS, TABLE_TEXT, TEXT_EDIT, BothReader, ChunkSource, Counter, Node, RangeReader, TableReader, TextTarget, has
from .plan import CatchUp, CopyPlan, PlanError, Verdict, compare, expected_table, foreign_addresses, plan_copy
from .rangecheck import MAX_SHARE, RangeCheck, both_digests, check_ranges
from .reach import netns_hint, route_error
from .readback import read_node
from .report import MigrationReport, PhaseClock, PhaseTiming
from .steering import Steering
from ..wire.nattext import EntryStream, ForwardedEntries, TextTable
from .txn import Locks, already_pending, cancel_pending, confirm_admission, confirmed_admission, describe_error, missing_capabilities, nothing_pending, persist_token

log = logging.getLogger(__name__)

WRITABLE_RUNNING = "urn:ietf:params:netconf:capability:writable-running:1.0"
#: Chunks of the source's reply that may wait for the copy at once (the agent sends ~64 KB a chunk).
CHUNKS_QUEUED = 64
#: Slices sent to the target and not yet answered (each up to copy_chunk entries, ~9 MB at 25,000).
WRITES_AHEAD = 3
RETIRE_MODES = ("delete", "keep", "stop")
VERIFY_SOURCE = ("digest", "read")


class MigrationError(ControllerError):
    """A migration failed; ``report`` says which phase and where each NAT was left."""

    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        states = "; ".join(f"{n}: {s}" for n, s in report.node_state.items())
        super().__init__(
            f"migration {report.source} -> {report.target} failed in phase {report.failed_phase}: {report.error}. "
            f"Traffic on {report.traffic_on}. {states}"
        )


@dataclass
class Endpoint:
    """A named NAT node and how to open a NETCONF session to it.

    ``open`` returns a new :class:`Node` session each call (the migration opens
    two to the source: one for RPCs, one for notifications).  ``public``: the
    addresses the node owns, when known (checked against the source's
    translated addresses).  ``stop``: how to stop the node (retire=stop).
    """

    name: str
    open: Callable[[], Node]
    public: set[str] | None = None
    stop: Callable[[], None] | None = None


@dataclass
class MigrateOptions:
    """Knobs of a migration.

    ``copy_state`` False skips copy, catch-up and verify: the negative
    control, in which live flows must break.  ``settle``: how long the
    source's event stream must stay quiet after the freeze (seconds);
    ``settle_max`` bounds that wait.  ``retire``: one of :data:`RETIRE_MODES`.
    """

    copy_state: bool = True
    retire: str = "delete"
    settle: float = 0.01
    settle_max: float = 1.0
    freeze_source: bool = True
    copy_chunk: int = 25_000
    #: how verify knows the frozen source's table: "digest" (its nat-statistics
    #: digest against the snapshot folded with the events; a re-read when they
    #: differ) or "read" (always re-read it whole: slower, needs no notification).
    verify_source: str = "digest"
    #: seconds after which an agent rolls back by itself what an interrupted
    #: migration left pending (the target's unconfirmed copy, the source's
    #: freeze, the target's hold): the bound on how long a dead controller
    #: can keep a node refusing new sessions.
    confirm_timeout: float = 10.0
    #: the command a report names to repair what an interrupted migration left
    recover_hint: str = "natmig recover --inventory INVENTORY"

    def __post_init__(self) -> None:
        if self.retire not in RETIRE_MODES:
            raise ControllerError(f"retire: {self.retire!r} is not one of {', '.join(RETIRE_MODES)}")
        if not 0 <= self.settle <= self.settle_max:
            raise ControllerError(f"settle: need 0 <= settle ({self.settle}) <= settle_max ({self.settle_max})")
        if self.copy_chunk < 1:
            raise ControllerError(f"copy_chunk: {self.copy_chunk} must be at least 1")
        if self.verify_source not in VERIFY_SOURCE:
            raise ControllerError(f"verify_source: {self.verify_source!r} is not one of {', '.join(VERIFY_SOURCE)}")
        if not 1 <= self.confirm_timeout <= 3600:
            raise ControllerError(f"confirm_timeout: {self.confirm_timeout} s is not within 1..3600")


@dataclass
class _State:
    """What has been changed so far: what a rollback must undo."""

    target_candidate_dirty: bool = False
    added: list[SessionKey] = field(default_factory=list)
    #: a copy forwarded as text adds every entry of this table (its keys are read from the text only if a rollback needs them)
    added_table: ForwardedEntries | None = None
    target_admission: bool | None = None  # the value before we changed it
    source_admission: bool | None = None
    switched: bool = False
    committed: bool = False  # the target admits: the move is done, never undone
    #: confirmed commits pending on each node (rolled back by the agent unless confirmed)
    copy_pending: bool = False  # the target's copy
    target_hold: bool = False  # the target's closed admission
    source_frozen: bool = False  # the source's closed admission


class Migration:
    """One migration of ``source`` to ``target`` through ``steering``; call :meth:`run`."""

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
        self._src: Node | None = None
        self._events_node: Node | None = None
        self._tgt: Node | None = None
        self._sub: Any = None
        self._st = _State()
        self._snapshot: list[NatSession] = []
        #: when the source's snapshot had been read (perf_counter): its timeouts were read before
        self._snapshot_at: float | None = None
        #: the snapshot as the source's text, when the copy forwarded it undecoded (self._snapshot then stays empty until needed)
        self._snapshot_text: Any = None
        #: the copy forwarded the snapshot without keeping it: verify re-reads the source when it needs its table
        self._snapshot_lost = False
        self._target_before: list[NatSession] = []
        self._plan: CopyPlan | None = None
        self._catch = CatchUp()
        #: every event received, in order (the source's final table is the snapshot folded with them).
        self._events: list[tuple[str, NatSession]] = []
        self._source_admits = True
        #: the source's admission reopening, started during admit (see _admit)
        self._reopen: Any = None
        #: the source's and the target's nat-statistics requests (Futures): the source's
        #: both started after the catch-up, before the switch (see _start_digests)
        self._source_digest: Any = None
        self._target_digest: Any = None
        self._digest_pool: ThreadPoolExecutor | None = None
        #: the persist token of this migration's confirmed commits (see .txn)
        self._token = persist_token(source.name, target.name)
        self._locks: list[Locks] = []
        #: what recovery or success did on each node, in words (the report adds what is read back)
        self._actions: dict[str, list[str]] = {source.name: [], target.name: []}

    # --------------------------------------------------------------- driver

    def run(self) -> MigrationReport:
        """Run every phase; on failure roll back as the module docstring says.

        Returns the report; ``report.ok`` tells success.  Step failures never
        raise out of here (see :func:`migrate` for the raising form).
        """
        phases: list[tuple[str, Callable[[Any], None]]] = [("preflight", self._preflight)]
        if self.opt.copy_state:
            phases += [("copy", self._copy), ("catch-up", self._catch_up)]
        phases += [("switch", self._switch)]
        if self.opt.copy_state:
            phases += [("verify", self._verify)]
        phases += [("admit", self._admit), ("retire", self._retire)]
        try:
            for name, fn in phases:
                with self.clock.phase(name) as ph:
                    fn(ph)
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
            self._recover()
        except BaseException as e:  # Ctrl-C or a bug: still leave traffic where it works
            self.report.error = f"{type(e).__name__}: {e}"
            self._recover()
            self._read_back()
            self._close()
            raise
        if self.report.ok:
            self._describe_success()
        try:
            self._read_back()
        finally:
            self._close()
        return self.report

    # --------------------------------------------------------------- phases

    def _preflight(self, ph: Any) -> None:
        with ph.step("connect"):
            # Both in parallel: each is an SSH handshake of ~50-100 ms.
            # The source's second session carries the notifications.
            with ThreadPoolExecutor(3) as pool:
                futures = [
                    ("_src", self.source, pool.submit(self.source.open)),
                    ("_tgt", self.target, pool.submit(self.target.open)),
                ]
                if self.opt.copy_state:
                    futures.append(("_events_node", self.source, pool.submit(self.source.open)))
                errors = []
                for attr, ep, f in futures:
                    try:
                        setattr(self, attr, f.result())
                    except NatmigError as e:
                        role = "source" if ep is self.source else "target"
                        msg = f"{role} {ep.name}: {e}"
                        if msg not in errors:
                            errors.append(msg)
                if errors:
                    raise ControllerError("agent not reachable: " + "; ".join(errors))
        src, tgt = self._src, self._tgt
        assert src is not None and tgt is not None
        with ph.step("modules"):
            rs, rt = src.module_revision(), tgt.module_revision()
            if rs is None or rt is None:
                missing = [n.name for n, r in ((self.source, rs), (self.target, rt)) if r is None]
                raise ControllerError(f"agent(s) {', '.join(missing)} do not announce the nat-session module")
            if rs != rt:
                raise ControllerError(f"nat-session revisions differ: {self.source.name} has {rs}, {self.target.name} has {rt}")
            for role, ep, node in (("source", self.source, src), ("target", self.target, tgt)):
                missing = missing_capabilities(node)
                if missing:
                    raise ControllerError(
                        f"{role} {ep.name} does not announce {', '.join(':' + m for m in missing)}: a migration needs them "
                        "so that the agent undoes by itself what an interrupted migration left")
        with ph.step("lock"):
            # One node after the other, in the order of their names: two
            # migrations that share a node meet at the same first lock, and
            # one of them goes on (locking both at once, each could take one
            # node and both be refused).  A refusal names the holder.
            for role, ep, node in sorted((("source", self.source, src), ("target", self.target, tgt)), key=lambda x: x[1].name):
                self._locks.append(Locks.take(node, role))
        with ph.step("target+source+switch"):
            # Four independent reads at once, each on its own session: the
            # target's table and admission, the source's admission (what the
            # freeze must restore), the switch's active NAT, and the
            # subscription to the source's events (before the snapshot, so no
            # change after it is missed; an older event is harmless to re-apply).
            with ThreadPoolExecutor(3) as pool:
                fs = pool.submit(src.get_admission)
                fw = pool.submit(self.steering.active)
                fe = pool.submit(self._events_node.subscribe) if self.opt.copy_state and self._events_node is not None else None
                try:
                    if has(tgt, SESSIONS_AND_ADMISSION):
                        self._target_before, self._st.target_admission = cast(BothReader, tgt).get_sessions_and_admission("running")
                    else:
                        self._target_before = tgt.get_sessions("running")
                        self._st.target_admission = tgt.get_admission()
                    # What the exit status compares the read-back count with (report.outcome).
                    self.report.target_sessions_before = len(self._target_before)
                finally:
                    # Waited for even when the target failed: nothing runs on after the phase.
                    self._source_admits = fs.result()
                    active = fw.result()
                    if fe is not None:
                        self._sub = fe.result()
        if self.source.public is not None and self.target.public is not None and not self.source.public <= self.target.public:
            raise ControllerError(
                f"{self.target.name} does not own the public address(es) {', '.join(sorted(self.source.public - self.target.public))} of {self.source.name}"
            )
        fix = self.opt.recover_hint
        if active is not None and active != self.source.name:
            raise ControllerError(f"traffic goes through {active}, not through the source {self.source.name}: "
                                  f"migrate from {active}, or run `{fix}` if an earlier migration was interrupted. Nothing was changed")
        closed = [f"{role} {ep.name}" for role, ep, admits in (("source", self.source, self._source_admits), ("target", self.target, self._st.target_admission))
                  if admits is False]
        if closed:
            raise ControllerError(f"{' and '.join(closed)} does not admit new sessions (admission closed): an earlier migration may have been "
                                  f"interrupted, or its rollback is still pending. Nothing was changed; `{fix}` reopens it")
        ph.note(f"revision {rs}; target holds {len(self._target_before)} sessions")

    def _copy(self, ph: Any) -> None:
        src, tgt = self._src, self._tgt
        assert src is not None and tgt is not None
        assert self._sub is not None  # subscribed in preflight, before the snapshot
        if not self._target_before and has(src, TABLE_TEXT) and has(tgt, TEXT_EDIT):
            self._copy_text(ph, cast(TableReader, src), cast(TextTarget, tgt))
            return
        if has(src, CHUNKS) and not self._target_before:
            self._copy_streamed(ph, cast(ChunkSource, src).session_chunks, tgt)
            return
        with ph.step("get-config"):
            self._snapshot = src.get_sessions("running")
        self._snapshot_at = time.perf_counter()
        with ph.step("plan"):
            self._plan = plan_copy(self._snapshot, self._target_before, self.target.public)
            self._st.added = self._plan.added_keys
        with ph.step("edit-config"):
            self._st.target_candidate_dirty = True
            # Several edit-configs into the candidate, one commit: still all or
            # nothing on running.  Since the client sends in linear time the
            # chunk size barely matters for speed (100k entries: 2.1 s as one
            # request or as four of 25k); chunks bound the text held at once.
            ss, n = self._plan.sessions, self.opt.copy_chunk
            for i in range(0, len(ss), n):
                tgt.edit_sessions(ss[i:i + n], target="candidate", operation="merge")
        with ph.step("commit"):
            self._commit_copy(tgt)
        self.report.copied = len(self._plan.sessions)

    def _commit_copy(self, tgt: Node) -> None:
        """Commit the copy as a persistent confirmed commit: the target's agent removes it by itself unless confirmed.

        It is confirmed just before the switch (:meth:`_confirm_and_hold`),
        when the target holds every session of the frozen source; a
        controller that dies before leaves no copy behind.
        """
        # Marked before the call: a commit whose reply is lost may have happened.
        self._st.copy_pending = True
        tgt.commit(confirmed=True, timeout=self.opt.confirm_timeout, persist=self._token)
        self._st.target_candidate_dirty = False

    def _copy_text(self, ph: Any, src: Any, tgt: Any) -> None:
        """The copy into an idle target, the source's entries forwarded as the text it sent (see :mod:`natmig.wire.nattext`).

        The source's agent sends its table while it reads it from the kernel
        (a reply in many chunks); slices of whole entries go on to the target
        as they arrive, so the source's read, the transfer and the target's
        checks overlap (:class:`natmig.wire.nattext.EntryStream`).  The target's agent
        validates every entry, and nothing reaches its running datastore
        before the commit.  A reply in another form than the codec's own is
        decoded in full instead, as the streamed copy does.

        The reply is not kept here (only its count, public addresses and
        keys: :class:`natmig.wire.nattext.ForwardedEntries`), and at most
        :data:`CHUNKS_QUEUED` chunks and :data:`WRITES_AHEAD` slices wait at
        once: when the target falls behind, the rest of the reply waits in
        the source's SSH window, not in this process.  At 1,000,000 sessions
        the controller held the reply as bytes, as text and as queued
        slices: 1.5 GB.
        """
        codec = src.codec
        stream = EntryStream(codec, first=min(1000, self.opt.copy_chunk), most=self.opt.copy_chunk)
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=CHUNKS_QUEUED)
        sent = ForwardedEntries(codec)
        plain = True
        # Set before any write: a failure from here on discards the candidate.
        self._st.target_candidate_dirty = True
        with ThreadPoolExecutor(2) as pool:
            writes: collections.deque[Any] = collections.deque()

            def refused() -> bool:
                return any(w.done() and w.exception() is not None for w in writes)

            def send(parts: list[str]) -> bool:
                """Check and send slices; False once nothing more may be sent."""
                nonlocal plain
                for part in parts:
                    if not TextTable.plain_in(codec, part) or not sent.add(part):
                        plain = False
                        return False
                    if foreign_addresses(sent.addresses, self.target.public):
                        return False  # refused below, before this slice is sent
                    while len(writes) >= WRITES_AHEAD and not refused():
                        wait([writes[0]])
                        if writes[0].exception() is None:
                            writes.popleft()
                    if refused():
                        return False  # the target refused a slice: no use sending on
                    # Two requests in flight: the target's agent handles them
                    # in order, and reads the next while it handles one.
                    writes.append(pool.submit(tgt.edit_text, part, "candidate"))
                return True

            failure: BaseException | None = None
            drained = threading.Event()

            def put(chunk: bytes | None) -> None:
                # Waits while the copy is behind, but never once it has stopped taking chunks
                # (a chunk after the end mark, in ncclient's transport thread, would hang the session).
                while not drained.is_set():
                    try:
                        chunks.put(chunk, timeout=0.1)
                        return
                    except queue.Full:
                        pass

            with ph.step("get-config"):
                with ThreadPoolExecutor(1, thread_name_prefix="natmig-read") as reader:
                    reading = reader.submit(src.read_table, "running", put, keep=False)
                    reading.add_done_callback(lambda _f: put(None))
                    going = True
                    try:
                        while (chunk := chunks.get()) is not None:
                            if going:
                                try:
                                    going = send(stream.feed(chunk))
                                except BaseException as e:  # noqa: BLE001 - the reader must still be drained (it waits on the queue); raised below
                                    failure, going = e, False
                            else:
                                stream.fed += len(chunk)
                    finally:
                        drained.set()
                    reply = reading.result()
                if failure is not None:
                    raise failure
                self._snapshot_at = time.perf_counter()
                if not reply.tapped:
                    going = send(stream.feed(reply.raw.encode()))
                elif stream.fed != reply.received:
                    raise ControllerError("the source's reply differs from the chunks it arrived in; nothing committed")
            # Recorded before the commit: what a failure after it removes.
            self._st.added_table = sent
            whole = None if reply.elided else reply
            with ph.step("edit-config"):
                if going:
                    rest = stream.finish()
                    if rest is None:
                        # The body was not cut while it arrived (an empty <data/>, another spelling): from the whole reply.
                        whole = whole or src.read_table("running")
                        table = TextTable.of(whole.raw, codec)
                        if table is None:
                            plain = False
                        else:
                            send(table.slices(4, self.opt.copy_chunk))
                    else:
                        send(rest)
                for w in writes:
                    w.result()
        if not plain:
            # Another spelling than the codec's: decode the whole reply (read
            # again when it was not kept) and write it all again (a merge of
            # what is already in the candidate changes nothing); its keys are
            # then known decoded.
            self._st.added_table = None
            self._copy_decoded(ph, whole or src.read_table("running"), tgt)
            return
        # The snapshot as text, for verify when the digests differ; not kept when it was only forwarded.
        self._snapshot_text = whole
        self._snapshot_lost = whole is None
        with ph.step("plan"):
            # The whole snapshot's plan, before anything is committed.
            conflicts = foreign_addresses(sent.addresses, self.target.public)
            if conflicts:
                raise PlanError(conflicts)
            self._plan = CopyPlan([], frozenset(), 0)
        with ph.step("commit"):
            self._commit_copy(tgt)
        self.report.copied = sent.count

    def _copy_decoded(self, ph: Any, reply: Any, tgt: Any) -> None:
        """The streamed copy of a reply decoded whole by the codec (a form the text copy does not forward)."""
        sessions = reply.sessions()
        self._copy_streamed(ph, lambda _src, size, pieces=1: (sessions[i:i + size] for i in range(0, len(sessions), size)), tgt)

    def _source_snapshot(self) -> list[NatSession] | None:
        """The snapshot, decoded (once) when the copy forwarded it as text; None when it was forwarded and not kept."""
        if self._snapshot_lost:
            return None
        if self._snapshot_text is not None:
            self._snapshot, self._snapshot_text = self._snapshot_text.sessions(), None
        return self._snapshot

    def _copy_streamed(self, ph: Any, chunks: Callable[..., Iterator[list[NatSession]]], tgt: Node) -> None:
        """The copy into an idle target, the snapshot decoded while the target writes it.

        The controller decodes one slice of the source's reply while the
        target's agent (another process) decodes and checks the previous one
        into its candidate (100k sessions: get-config and edit-config
        3.7 s -> 3.1 s).  Nothing reaches running before the plan of the
        whole snapshot has passed and the commit is sent; when the plan
        fails, recovery discards the candidate.
        """
        with ph.step("get-config"):
            # A table smaller than four chunks is still cut in four: the
            # overlap then pays at 10k too (copy ~590 -> ~535 ms).
            parts = chunks("running", self.opt.copy_chunk, pieces=4)
        self._snapshot_at = time.perf_counter()
        sent: list[NatSession] = []
        with ph.step("decode+edit-config"):
            self._st.target_candidate_dirty = True
            with ThreadPoolExecutor(1) as pool:
                writes = []
                for part in parts:
                    self._snapshot += part
                    sent += part
                    # Recorded before the write: a write whose reply is lost may still have happened.
                    self._st.added += [s.key for s in part]
                    writes.append(pool.submit(tgt.edit_sessions, part, target="candidate", operation="merge"))
                    if any(w.done() and w.exception() is not None for w in writes):
                        break  # the target refused a slice: no use decoding on
                for w in writes:
                    w.result()
        with ph.step("plan"):
            self._plan = plan_copy(self._snapshot, self._target_before, self.target.public)
            if self._plan.sessions != sent:
                raise ControllerError("the sessions written to the candidate differ from the copy plan; nothing committed")
            self._st.added = self._plan.added_keys
        with ph.step("commit"):
            self._commit_copy(tgt)
        self.report.copied = len(self._plan.sessions)

    def _catch_up(self, ph: Any) -> None:
        src, tgt = self._src, self._tgt
        assert src is not None and tgt is not None
        # The target's copy is confirmed and its admission held on its own
        # session while the source freezes and settles: both must be done
        # before the switch, and neither needs the other (the target carries
        # no traffic yet; catch-up writes go to its running datastore for
        # good either way).  Off the hold window: ~15 ms at 10k.
        pool = ThreadPoolExecutor(1)
        holding = pool.submit(self._confirm_and_hold, tgt)
        pool.shutdown(wait=False)
        try:
            self._settle_and_apply(ph, src, tgt)
        finally:
            with ph.step("confirm+hold"):
                # Waited for even when the source failed: recovery must know what is pending.
                holding.result()
        self._check_alive()
        self._start_digests()

    def _settle_and_apply(self, ph: Any, src: Node, tgt: Node) -> None:
        """Freeze the source, wait for its events to settle, write what they changed into the target."""
        if self.opt.freeze_source:
            with ph.step("freeze"):
                self._freeze(src)
        with ph.step("settle"):
            early = self._sub.drain()
            self._events += early
            self._catch.extend(early)
            deadline = time.perf_counter() + self.opt.settle_max
            while time.perf_counter() < deadline:
                ev = self._sub.get(timeout=self.opt.settle)
                if ev is None:
                    break
                self._events.append(ev)
                self._catch.add(*ev)
            else:
                self.report.notes.append(f"source events did not settle within {self.opt.settle_max} s; verify will reconcile")
        ups, dels = self._catch.take()
        # Recorded before the write: a write whose reply is lost may still have happened.
        added = set(self._st.added)
        self._st.added += [s.key for s in ups if s.key not in added and self._plan is not None and s.key not in self._plan.already]
        with ph.step("apply"):
            self._write(tgt, ups, dels)
        self.report.events = self._catch.events
        self.report.caught_up = len(ups)
        self.report.caught_up_deleted = len(dels)

    def _confirm_and_hold(self, tgt: Node) -> None:
        """The target keeps its copy for good, and holds new sessions until the admit, undone by itself if the controller dies.

        Confirmed at the catch-up, before the switch: from the switch on
        traffic may run through the target, and a rollback must then never
        take its sessions away.  The hold is a new
        confirmed commit, so a dead controller leaves the node that carries
        traffic admitting new sessions again after ``confirm_timeout``.
        """
        if self._st.copy_pending:
            try:
                tgt.commit(persist_id=self._token)
            except NatmigError as e:
                if nothing_pending(e):
                    self._st.copy_pending = False  # the agent already removed it
                    raise ControllerError(
                        f"the target's copy rolled back by itself before it was confirmed: the copy and catch-up took longer "
                        f"than --confirm-timeout ({self.opt.confirm_timeout:g} s); raise it for a table this size") from e
                raise
            self._st.copy_pending = False
        self._st.target_hold = True
        confirmed_admission(tgt, False, self._token, self.opt.confirm_timeout)

    def _check_alive(self) -> None:
        """Abort before the switch when a session to a node (or the source's event stream) is gone."""
        lost = [f"{what} {ep.name}" for what, ep, node in (
            ("source", self.source, self._src), ("the event stream of source", self.source, self._events_node), ("target", self.target, self._tgt))
            if node is not None and not node.connected]
        if lost:
            raise ControllerError(f"NETCONF session lost before the switch: {', '.join(lost)}; traffic not moved")

    def _start_digests(self) -> None:
        """Ask both nodes for their digests now, for verify to use: they are computed while the switch happens.

        Both tables are already the ones verify must see: the source is
        frozen and its events have settled; the target holds the copy and
        the catch-up, carries no traffic yet, and from the switch on can
        only lose a session (a close, a timeout: new ones are held), never
        gain or re-map one.  Both reads are inside the hold window (the
        source's freeze to the target's admit), which is what new
        connections wait for: asked here rather than the target's after
        the switch, the window shrank by ~250 ms at 10k on a loaded
        two-core machine (1,257-1,380 -> 1,032-1,070 ms, with the O(table)
        catch-up of then), for a switch that two table reads beside it can
        slow (an earlier measurement: 17 -> 28 ms at 10k).
        """
        src, tgt = self._src, self._tgt
        if self.opt.verify_source != "digest" or src is None or tgt is None or not has(src, STATISTICS) or not has(tgt, STATISTICS):
            return
        self._digest_pool = ThreadPoolExecutor(2)
        self._source_digest = self._digest_pool.submit(cast(Counter, src).get_statistics)
        self._target_digest = self._digest_pool.submit(cast(Counter, tgt).get_statistics)
        self._digest_pool.shutdown(wait=False)

    def _freeze(self, src: Node) -> None:
        # Recorded before the change, so that a failure half-way still undoes it.
        self._st.source_admission = self._source_admits
        self._st.source_frozen = True
        self.report.hold_started = time.perf_counter()
        confirmed_admission(src, False, self._token, self.opt.confirm_timeout)

    def _switch(self, ph: Any) -> None:
        if self.opt.copy_state:
            # Checked again at the last moment: a node lost since the catch-up ended must not get traffic.
            self._check_alive()
        # Marked switched before the call: if the switch fails half-way (one
        # bundle cannot; across several switches the steering undoes its
        # steps) the rollback still points back.
        self._st.switched = True
        with ph.step("flows"):
            self.steering.point_to(self.target.name)

    def _verify(self, ph: Any) -> None:
        src, tgt = self._src, self._tgt
        assert src is not None and tgt is not None
        count = cast(Counter, src).get_statistics if self.opt.verify_source == "digest" and has(src, STATISTICS) else None
        read_table = cast(TableReader, tgt).read_table if has(tgt, TABLE_TEXT) else None
        target_stats = cast(Counter, tgt).get_statistics if count is not None and has(tgt, STATISTICS) else None
        with ph.step("digests" if target_stats is not None else "read"):
            # Of the frozen source only its digest (nat-statistics): its table
            # is the snapshot folded with the events, and an equal digest
            # proves it (see _source_final).  Of the target, its digest too
            # when it can give one: equal to the source's final table's, it
            # proves the target holds exactly those sessions and mappings
            # without shipping the table.  Both at once: two agents.
            if self._source_digest is not None and self._target_digest is not None and target_stats is not None:
                fs, ft = self._source_digest, self._target_digest
                self._source_digest = self._target_digest = None
                got, stats = ft.result(), fs.result()
            else:
                with ThreadPoolExecutor(2) as pool:
                    if target_stats is not None:
                        ft = pool.submit(target_stats)
                    else:
                        ft = pool.submit(read_table, "running") if read_table is not None else pool.submit(tgt.get_sessions, "running")
                    fs = pool.submit(count) if count is not None else None
                    got = ft.result()
                    stats = fs.result() if fs is not None else None
        if target_stats is not None and stats is not None and stats.get("digest") is not None and stats.get("digest") == got.get("digest"):
            # Both agents fingerprinted their own kernel tables: equal digests
            # mean the target holds exactly the frozen source's sessions, every
            # key and mapping.  No table crosses the network, and the snapshot
            # forwarded as text is never decoded here.
            late = self._sub.drain() if self._sub is not None else []
            self._events += late
            self.report.events += len(late)
            self.report.verified = int(stats.get("sessions", 0))
            self.report.source_check = self.report.target_check = "digest"
            ph.note(f"all {self.report.verified} source sessions on the target with the same mapping (the two nodes' digests are equal)")
            return
        if target_stats is not None and has(src, RANGES) and has(tgt, RANGES):
            # Only the key ranges whose digests differ are read (see .rangecheck).
            ranged = self._by_ranges(ph, src, tgt)
            if ranged is not None:
                ph.note(ranged.describe())
                self._settle_verdict(ph, src, tgt, ranged.verdict, False, ranged.read_at)
                return
        at_switch = self._source_final(stats)
        # Folded: the timeouts in at_switch are the snapshot's and the events' (traffic before the switch may have renewed them since).
        folded = at_switch is not None
        if at_switch is None:
            with ph.step("read-source"):
                at_switch = src.get_sessions("running")
        # Every timeout in at_switch was read before this moment.  Folded, most
        # came with the snapshot: its time picks which ones to ask the source
        # about again (a session an event renewed is among them at worst).
        known_at = self._snapshot_at if folded and self._snapshot_at is not None else time.perf_counter()
        if target_stats is not None:
            if got.get("digest") == table_digest(at_switch):
                self.report.verified = len(at_switch)
                self.report.target_check = "digest"
                ph.note(f"all {len(at_switch)} source sessions on the target with the same mapping "
                        f"(target and source digests equal the snapshot and events)")
                return
            # Not equal (a target that held sessions before, a missing or
            # re-mapped one): read the target's table and say what differs.
            with ph.step("read"):
                got = read_table("running") if read_table is not None else tgt.get_sessions("running")
        self.report.target_check = "read"
        with ph.step("compare"):
            if read_table is None:
                verdict = compare(at_switch, got)
            elif got.holds(at_switch):
                # Proven from the reply's text: every source session, same key and mapping.
                verdict = Verdict([], [], max(0, got.size - len(at_switch)), len(at_switch))
            else:
                # Not a plain yes: decode the whole reply (the codec's checks) and say exactly what differs.
                verdict = compare(at_switch, got.sessions())
        self._settle_verdict(ph, src, tgt, verdict, folded, known_at)

    def _by_ranges(self, ph: Any, src: Node, tgt: Node) -> RangeCheck | None:
        """verify by key range (:mod:`.rangecheck`); None when too much differs (the tables are read whole then)."""
        # Late notifications are counted as the other paths count them; the source is read after the switch, so they are not needed.
        late = self._sub.drain() if self._sub is not None else []
        self._events += late
        self.report.events += len(late)
        s, t = cast(RangeReader, src), cast(RangeReader, tgt)
        with ph.step("range-digests"):
            digests = both_digests(s, t)
        with ph.step("range-sessions"):
            ranged = check_ranges(s, t, *digests)
        if ranged is None:
            log.info("more than %d%% of the two tables differ by key range: reading them whole", int(MAX_SHARE * 100))
            return None
        self.report.source_check = self.report.target_check = "ranges"
        self.report.range_sessions_read = ranged.read_source + ranged.read_target
        return ranged

    def _settle_verdict(self, ph: Any, src: Node, tgt: Node, verdict: Verdict, folded: bool, known_at: float) -> None:
        """Write what the target misses (unless a session is re-mapped, or has ended), and fail unless all is then there."""
        if verdict.missing and not verdict.remapped:
            missing, ended = self._not_ended(ph, src, verdict.missing, folded, known_at)
            # The target still drops unknown sessions' packets, so a missing
            # session has not been re-mapped yet: write it now.
            with ph.step("reconcile"):
                written_at = time.perf_counter()
                self._write(tgt, missing, [])
                self._st.added += [s.key for s in missing]
                self.report.reconciled = len(missing)
                reread_at = time.perf_counter()
                if not missing:
                    on_target = []
                elif self.report.target_check == "ranges":
                    # Only the ranges of what was written: at 1,000,000 a whole read here is what verify by range avoids.
                    on_target = cast(RangeReader, tgt).get_range_sessions({key_range(s.key) for s in missing})
                    self.report.range_sessions_read = (self.report.range_sessions_read or 0) + len(on_target)
                else:
                    on_target = tgt.get_sessions("running")
            after = compare(missing, on_target)
            # Written with the few seconds they had left, some may have run
            # out by their own timer before the target was read again.
            lapsed = [s for s in after.missing if ran_out(s, written_at, reread_at)]
            ended += len(lapsed)
            verdict = Verdict([s for s in after.missing if not ran_out(s, written_at, reread_at)], after.remapped,
                              verdict.extra, verdict.checked - ended)
            if ended:
                self.report.expired = ended
                ph.note(f"{ended} source session(s) ended on the source (timed out) before the target was read: nothing to move")
        if not verdict.ok:
            raise ControllerError(f"verification failed: {verdict.describe()}")
        self.report.verified = verdict.checked
        how = {"digest": " (source: its digest matched the snapshot and events)", "ranges": " (by key range: source and target read in the ranges that differ)"}
        ph.note(verdict.describe() + how.get(self.report.source_check or "", " (source: re-read)"))

    def _not_ended(self, ph: Any, src: Node, missing: list[NatSession], folded: bool, known_at: float) -> tuple[list[NatSession], int]:
        """Of the sessions the target was found without, those still to write (fresh when re-read), and how many have ended.

        A session whose remaining timeout, as the source last gave it, has run
        out by now has ended on the source, and so would its copy on the
        target, made with the same remaining lifetime: nothing to move,
        whether the target lost it before or after its table was read.  That
        is exact when the source was read after the switch (it is frozen and
        carries no traffic since); when its table is the snapshot folded with
        the events, traffic before the switch may have renewed those timers,
        so the source is asked again and only those gone from it count.
        At 1,000,000 sessions a table read takes a minute, and a benchmark
        table loaded 900 s earlier lost ~300,000 entries to their timers
        between the source's read and the target's: every one was reported
        missing, and the reconcile wrote them back with the second they had left.
        """
        now = time.perf_counter()
        lapsed = {s.key for s in missing if ran_out(s, known_at, now)}
        if not lapsed:
            return missing, 0
        fresh: dict[SessionKey, NatSession] = {}
        if folded:
            with ph.step("re-read-source"):
                fresh = {s.key: s for s in src.get_sessions("running") if s.key in lapsed}
            lapsed -= fresh.keys()
        return [fresh.get(s.key, s) for s in missing if s.key not in lapsed], len(lapsed)

    def _source_final(self, stats: dict[str, Any] | None) -> list[NatSession] | None:
        """The frozen source's table as the snapshot and every event imply it, when its digest proves it; else None.

        The source computes the digest of its real table (nat-statistics);
        the controller computes it over the snapshot folded with every event
        received.  Equal digests mean equal tables: every key and mapping.
        Any difference (a notification still on its way, in either
        direction) is answered by a full re-read of the source.
        """
        # Late notifications after the settle are folded in too.
        late = self._sub.drain() if self._sub is not None else []
        self._events += late
        self.report.events += len(late)
        snapshot = self._source_snapshot()
        if stats is None or "sessions" not in stats or snapshot is None:
            self.report.source_check = "read"
            return None
        implied = expected_table(snapshot, self._events)
        # The count alone would miss a created and a destroyed notification
        # both still on their way (they cancel out); the digest covers every
        # key and mapping, so only an equal table passes.
        if stats.get("digest") != table_digest(implied.values()):
            log.info("source holds %d sessions (digest %s), snapshot and events imply %d: re-reading it",
                     stats["sessions"], stats.get("digest"), len(implied))
            self.report.source_check = "read"
            return None
        self.report.source_check = "digest"
        return list(implied.values())

    def _admit(self, ph: Any) -> None:
        tgt, src = self._tgt, self._src
        assert tgt is not None and src is not None
        # The source's freeze is undone meanwhile, on its own session, when
        # retirement will reopen it anyway (it carries no traffic now).  Its
        # outcome belongs to the retire phase, which waits for it: a failure
        # there never moves traffic back.
        if self.opt.retire != "stop" and self._st.source_frozen:
            pool = ThreadPoolExecutor(1)
            self._reopen = pool.submit(self._thaw, src)
            pool.shutdown(wait=False)
        if self._st.target_hold:
            try:
                confirm_admission(tgt, True, self._token)
            except NatmigError as e:
                if not nothing_pending(e):
                    raise
                # The hold outlived confirm_timeout and the agent rolled it
                # back (the target admits already): open it for good.
                self.report.notes.append(f"the target's hold had rolled back by itself before the admit (confirm_timeout {self.opt.confirm_timeout} s is short for this migration)")
                tgt.set_admission(True)
            self._st.target_hold = False
        else:
            tgt.set_admission(True)
        if self.report.hold_started is not None:
            self.report.hold_ended = time.perf_counter()
        # From here the target may create sessions the source never had:
        # pointing traffic back would lose them, so nothing below undoes the move.
        self._st.committed = True

    def _thaw(self, src: Node) -> None:
        """Undo the source's freeze: cancel its confirmed commit (its admission returns to what it was before)."""
        cancel_pending(src, self._token)  # False: it had already rolled back by itself
        self._st.source_frozen = False
        self._st.source_admission = None

    def _retire(self, ph: Any) -> None:
        src = self._src
        assert src is not None
        mode = self.opt.retire
        if mode == "stop":
            if self.source.stop is None:
                raise ControllerError(f"retire=stop: no way to stop {self.source.name} is configured")
            self.source.stop()
            return
        if self._reopen is not None:
            with ph.step("reopen"):
                self._reopen.result()  # started with admit; waited for before anything else on that session
        elif self._st.source_frozen:
            with ph.step("reopen"):
                self._thaw(src)
        if mode == "delete":
            with ph.step("delete"):
                self._delete(src, None)
                self.report.retired = self.report.verified if self.opt.copy_state else 0

    # -------------------------------------------------------------- helpers

    @staticmethod
    def _write(node: Node, ups: Sequence[NatSession], dels: Sequence[SessionKey]) -> None:
        """Write and delete on the running datastore (candidate + commit when running is not writable)."""
        if not ups and not dels:
            return
        direct = WRITABLE_RUNNING in node.capabilities
        where = "running" if direct else "candidate"
        if ups:
            node.edit_sessions(ups, target=where, operation="merge")
        if dels:
            node.delete_sessions(dels, target=where)
        if not direct:
            node.commit()

    @staticmethod
    def _delete(node: Node, keys: Sequence[SessionKey] | None) -> None:
        direct = WRITABLE_RUNNING in node.capabilities
        node.delete_sessions(keys, target="running" if direct else "candidate")
        if not direct:
            node.commit()

    def _recover(self) -> None:
        """Put traffic where it works and undo what this migration changed (best effort, every step reported).

        What the agents hold pending (the copy, the freeze, the hold) is
        cancelled now; what cannot be reached rolls back by itself within
        ``confirm_timeout``.
        """
        st = self._st
        for f in (self._source_digest, self._target_digest, self._reopen):
            # Requests still in flight on the sessions recovery is about to use: let them finish.
            if f is not None:
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - only waited for; its outcome is read back below
                    pass
        self._source_digest = self._target_digest = None
        if self._digest_pool is not None:
            self._digest_pool.shutdown(wait=False)
        src, tgt = self._src, self._tgt
        later = f"the agent rolls it back by itself within {self.opt.confirm_timeout:g} s"
        if st.committed:
            # Only the retirement failed: the move stands.
            if src is not None and st.source_frozen:
                try:
                    self._thaw(src)
                    self._actions[self.source.name].append("freeze cancelled, admission restored")
                except NatmigError as e:
                    self._actions[self.source.name].append(f"freeze not cancelled ({describe_error(e)}); {later}")
            self._actions[self.source.name].append("retirement failed")
            return
        src_do, tgt_do = self._actions[self.source.name], self._actions[self.target.name]
        back = True
        if st.switched:
            try:
                self.steering.point_to(self.source.name)
                src_do.append("traffic pointed back to it")
            except NatmigError as e:
                back = False
                src_do.append(f"could NOT point traffic back ({describe_error(e)})")
        if st.source_frozen:
            if src is None:
                src_do.append(f"unreachable: its freeze is pending, {later}")
            else:
                try:
                    cancel_pending(src, self._token)
                    st.source_frozen = False
                    src_do.append("freeze cancelled, admission restored")
                except NatmigError as e:
                    src_do.append(f"freeze could NOT be cancelled now ({describe_error(e)}); {later}")
        if tgt is None:
            if self.report.failed_phase != "preflight":
                tgt_do.append(f"unreachable: anything pending there, {later}")
            return
        if st.target_candidate_dirty:
            try:
                tgt.discard()
                tgt_do.append("candidate discarded")
            except NatmigError as e:
                tgt_do.append(f"candidate could not be discarded ({describe_error(e)})")
        if st.copy_pending or st.target_hold:
            what = "copy rolled back" if st.copy_pending else "hold cancelled"
            try:
                cancel_pending(tgt, self._token)
                st.target_hold = False
                tgt_do.append(what)
            except NatmigError as e:
                tgt_do.append(f"{what.split()[0]} NOT cancelled now ({describe_error(e)}); {later}")
        # Sessions the copy wrote for good (confirmed before the switch),
        # caught up from events or reconciled: removed while traffic is on the source.
        added = list(st.added)
        if not st.copy_pending and st.added_table is not None:
            # Keys caught up from events may also be in the forwarded table: each once.
            added = list(dict.fromkeys(added + st.added_table.keys()))
        if st.copy_pending:
            st.copy_pending = False  # cancelled above, or rolling back by itself
        if added and back:
            try:
                self._delete(tgt, added)
                tgt_do.append(f"the {len(added)} sessions copied to it removed")
            except NatmigError as e:
                tgt_do.append(f"the {len(added)} sessions copied to it may remain ({describe_error(e)})")

    def _describe_success(self) -> None:
        r = self.report
        retired = {"delete": "retired: its sessions removed, admission reopened", "keep": "retired: sessions kept, admission reopened", "stop": "stopped"}[self.opt.retire]
        self._actions[self.source.name].append(retired)
        self._actions[self.target.name].append(f"{r.verified} sessions verified, admission opened")

    def _read_back(self) -> None:
        """What the report says of each node and of the switch, read from them now: never what the code assumes it did."""
        r = self.report
        try:
            active = self.steering.active()
        except NatmigError as e:
            active = None
            r.notes.append(f"the switch could not be read back: {describe_error(e)}")
        r.traffic_on = active or "unknown"

        with ThreadPoolExecutor(2) as pool:
            views = list(pool.map(lambda x: read_node(*x), (
                (self.source.name, "source", self._src), (self.target.name, "target", self._tgt))))
        for v in views:
            carries = active == v.name
            if v.reachable:
                r.readback[v.name] = {"admits": v.admits, "sessions": v.sessions, "carries_traffic": carries}
            done = self._actions[v.name] or (["unchanged"] if not r.ok else [])
            r.node_state[v.name] = "; ".join([v.words(carries)] + done)
        if not r.ok and any(v.get("admits") is False for v in r.readback.values()):
            r.notes.append(f"a node still refuses new sessions: `{self.opt.recover_hint}` reopens it (or wait {self.opt.confirm_timeout:g} s for its rollback)")

    def _close(self) -> None:
        for lock in self._locks:
            if lock.node.connected:
                lock.release()
        self._locks = []
        for node in (self._events_node, self._src, self._tgt):
            if node is not None:
                try:
                    node.close()
                except Exception:  # closing a dead session must not hide the real outcome
                    pass


def ran_out(s: NatSession, read_at: float, checked_at: float) -> bool:
    """Whether ``s``, read with its remaining ``timeout`` before ``read_at``, had certainly timed out by ``checked_at`` (perf_counter times).

    One second of slack: the kernel counts timeouts in whole seconds.
    """
    return s.timeout is not None and read_at + s.timeout + 1 <= checked_at


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
