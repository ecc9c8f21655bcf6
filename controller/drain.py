"""`natmig drain`: move every NAT instance off a machine (host), each to its twin on another, N at a time.

A drain is many migrations, not a new kind of one: each move is a
:class:`~natmig.controller.migrate.Migration` of its own (its own NETCONF
sessions, locks and confirmed commits, its own rollback), given a steering
that reads and rewrites only its own instance's rules (see
:class:`~natmig.controller.steering.FabricSteering`), so moves in flight at
once on the same switches do not clobber each other's flows.

Pairing (:func:`pair_moves`, pure) reads the inventory alone: each agent on
the drained machine goes to the one agent on the target machine that serves
the same networks (``networks``, its instance); none or several is a usage
error naming the agent, and nothing is moved.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .inventory import Inventory, InventoryError
from .migrate import Endpoint, MigrateOptions, Migration
from .report import MigrationReport, PhaseTiming, ms
from .steering import Steering


class PairingError(InventoryError):
    """The inventory cannot say where each NAT of the drained machine goes (``problems``: every one found)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("cannot pair the NAT nodes to move:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Move:
    """One NAT instance's move: from ``source`` on the drained machine to its twin ``target``."""

    source: str
    target: str
    networks: tuple[str, str]


def pair_moves(inv: Inventory, host: str, to: str) -> list[Move]:
    """Each agent on machine ``host`` with its twin on ``to`` (same networks), in inventory order; :class:`PairingError` lists every problem."""
    problems: list[str] = []
    if host == to:
        problems.append(f"--host and --to are both {host}: drain moves NAT nodes to another machine")
    unplaced = [name for name, a in inv.agents.items() if a.machine is None]
    if unplaced:
        problems.append(f"agents.{unplaced[0]}.machine: missing (a drain needs the machine of every agent; "
                        f"missing for {', '.join(unplaced)})")
    machines = sorted({a.machine for a in inv.agents.values() if a.machine is not None})
    for flag, m in (("--host", host), ("--to", to)):
        if machines and m not in machines:
            problems.append(f"{flag} {m}: no agent of the inventory runs on it (machines: {', '.join(machines)})")
    moves: list[Move] = []
    taken: dict[str, str] = {}
    for name, a in inv.agents.items():
        if a.machine != host:
            continue
        twins = [t.name for t in inv.agents.values() if t.machine == to and t.networks == a.networks]
        nets = "/".join(a.networks)
        if not twins:
            problems.append(f"agents.{name}: no agent on machine {to} serves its networks {nets} (a twin with networks = {list(a.networks)!r})")
        elif len(twins) > 1:
            problems.append(f"agents.{name}: several agents on machine {to} serve its networks {nets} ({', '.join(twins)}); one twin is needed")
        elif twins[0] in taken:
            problems.append(f"agents.{name}: its twin {twins[0]} on {to} is also the twin of {taken[twins[0]]} (both serve {nets} on {host})")
        else:
            taken[twins[0]] = name
            moves.append(Move(name, twins[0], a.networks))
    if not problems and not moves:
        problems.append(f"--host {host}: no agent of the inventory runs on it; nothing to drain")
    if problems:
        raise PairingError(problems)
    return moves


@dataclass
class DrainOptions:
    """How a drain runs: ``parallel`` moves at once, each with ``migrate`` options.

    ``recover_hint``, given, is each move's repair command with ``{source}``
    and ``{target}`` in it (a failed move's report names its own).
    """

    parallel: int = 1
    migrate: MigrateOptions = field(default_factory=MigrateOptions)
    recover_hint: str | None = None

    def for_move(self, move: "Move") -> MigrateOptions:
        """The migration options of one move."""
        if self.recover_hint is None:
            return self.migrate
        return replace(self.migrate, recover_hint=self.recover_hint.replace("{source}", move.source).replace("{target}", move.target))


@dataclass
class MoveResult:
    """One move's outcome, from its migration report (``report``), or ``error`` when it could not even start."""

    move: Move
    report: MigrationReport | None
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0
    #: the command that repairs what this move left, when it needs it
    recover_hint: str = ""

    @property
    def ok(self) -> bool:
        """The migration succeeded (every phase; traffic read back on the target)."""
        return self.report is not None and self.report.ok

    @property
    def sessions(self) -> int:
        """Sessions moved: copied, caught up and reconciled."""
        r = self.report
        return 0 if r is None else r.copied + r.caught_up + r.reconciled

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the outcome, the figures, and the migration's whole report."""
        r = self.report
        return {
            "source": self.move.source, "target": self.move.target, "networks": list(self.move.networks),
            "ok": self.ok, "outcome": r.outcome if r is not None else "unchanged",
            "error": self.error or (r.error if r is not None else None), "failed_phase": r.failed_phase if r is not None else None,
            "sessions_moved": self.sessions, "verified": r.verified if r is not None else 0,
            "hold_seconds": r.blackout_seconds if r is not None else None,
            "switch_seconds": r.phase_seconds("switch") if r is not None else 0.0,
            "seconds": self.ended - self.started, "started": self.started,
            "traffic_on": r.traffic_on if r is not None else None,
            "migration": r.to_dict() if r is not None else None,
        }


@dataclass
class DrainReport:
    """Every move of a drain, and the whole: wall time, how many succeeded."""

    host: str
    to: str
    parallel: int
    results: list[MoveResult]
    seconds: float

    @property
    def ok(self) -> bool:
        """Every move succeeded."""
        return all(r.ok for r in self.results)

    @property
    def attention(self) -> bool:
        """Some failed move's state needs `natmig recover` (read back changed, or unknown: its move raised)."""
        return any(not r.ok and (r.report is None or r.report.outcome == "attention") for r in self.results)

    @property
    def moved(self) -> int:
        """How many moves succeeded."""
        return sum(r.ok for r in self.results)

    def text(self) -> str:
        """For people: one line per NAT, then the total."""
        lines = [f"drain of machine {self.host} to {self.to}, {self.parallel} at a time:",
                 f"  {'source':<10} {'target':<10} {'result':<8} {'sessions':>9} {'hold':>10} {'switch':>10} {'move':>10}  traffic on (read back)"]
        for r in self.results:
            rep = r.report
            hold = rep.blackout_seconds if rep is not None else None
            lines.append(f"  {r.move.source:<10} {r.move.target:<10} {'ok' if r.ok else 'FAILED':<8} {r.sessions:>9} "
                         f"{ms(hold) if hold is not None else '-':>10} {ms(rep.phase_seconds('switch')) if rep is not None else '-':>10} "
                         f"{ms(r.ended - r.started):>10}  {rep.traffic_on if rep is not None else 'unknown'}")
            if not r.ok:
                why = r.error or (f"failed in {rep.failed_phase}: {rep.error}" if rep is not None else "")
                state = "; ".join(f"{n}: {s}" for n, s in rep.node_state.items()) if rep is not None else ""
                lines.append(f"    {why}" + (f" ({state})" if state else ""))
                if rep is None or rep.outcome == "attention":
                    lines.append(f"    the state needs attention: run `{r.recover_hint}`")
        lines.append(f"total: {self.moved}/{len(self.results)} moved in {ms(self.seconds)} wall time")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        holds = [r.report.blackout_seconds for r in self.results if r.report is not None and r.report.blackout_seconds is not None]
        return {
            "host": self.host, "to": self.to, "parallel": self.parallel, "ok": self.ok,
            "moved": self.moved, "moves": len(self.results), "seconds": self.seconds,
            "largest_hold_seconds": max(holds) if holds else None,
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=2)


class Drain:
    """Runs ``moves`` ``options.parallel`` at a time; each its own :class:`Migration` (endpoints and steering from the factories).

    ``endpoint(name)`` opens the way to an agent, ``steering(source)`` the
    steering of that source's instance.  ``on_done`` is called as each move
    ends (progress); ``on_phase(move, phase)`` as each phase of each ends.
    """

    def __init__(self, moves: list[Move], endpoint: Callable[[str], Endpoint], steering: Callable[[str], Steering],
                 options: DrainOptions | None = None, on_done: Callable[[MoveResult], None] | None = None,
                 on_phase: Callable[[Move, PhaseTiming], None] | None = None) -> None:
        self.moves = moves
        self.endpoint = endpoint
        self.steering = steering
        self.opt = options or DrainOptions()
        if self.opt.parallel < 1:
            raise InventoryError(f"--parallel {self.opt.parallel}: at least 1 move at a time")
        self.on_done = on_done
        self.on_phase = on_phase

    def _one(self, move: Move) -> MoveResult:
        t0 = time.perf_counter()

        def phase(ph: PhaseTiming) -> None:
            if self.on_phase is not None:
                self.on_phase(move, ph)

        try:
            options = self.opt.for_move(move)
            report = Migration(self.endpoint(move.source), self.endpoint(move.target), self.steering(move.source),
                               options, phase).run()
            result = MoveResult(move, report, None, t0, time.perf_counter(), options.recover_hint)
        except Exception as e:  # noqa: BLE001 - one move's failure (even a bug) must not stop the others; it is reported
            result = MoveResult(move, None, f"{type(e).__name__}: {e}", t0, time.perf_counter(), self.opt.for_move(move).recover_hint)
        if self.on_done is not None:
            self.on_done(result)
        return result

    def run(self, host: str = "", to: str = "") -> DrainReport:
        """Every move; returns the report (in the order of the moves) once all have ended."""
        t0 = time.perf_counter()
        results: dict[Move, MoveResult] = {}
        pool = ThreadPoolExecutor(self.opt.parallel, thread_name_prefix="natmig-drain")
        try:
            futures = {pool.submit(self._one, m): m for m in self.moves}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
        finally:
            # Ctrl-C: moves not started are not started; those in flight finish (or roll back) on their own.
            pool.shutdown(wait=True, cancel_futures=True)
        return DrainReport(host, to, self.opt.parallel, [results[m] for m in self.moves if m in results], time.perf_counter() - t0)
