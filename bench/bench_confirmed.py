"""Confirmed commit figures (MemoryProvider): the undo record's write, and a confirmed commit against a plain one.

For 10k and 100k sessions created by one commit into an empty table: the
journal's write alone (JSON, temporary file + rename, into a temporary
directory), its size, and the whole ``Datastore.commit`` with and without
``confirmed`` (with a state directory), median of 3.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, print_table, synthetic_table  # noqa: E402

from natmig.agent.confirmed import Journal, Record, Undo  # noqa: E402
from natmig.agent.datastore import Datastore, EditRequest  # noqa: E402
from natmig.agent.provider import MemoryProvider  # noqa: E402
from natmig.codec import EditEntry, default_codec  # noqa: E402
from natmig.model import FIELD_NAMES  # noqa: E402


def _commit_time(sessions: list, directory: Path, confirmed: bool) -> float:
    """One commit creating ``sessions`` in an empty table, in seconds."""
    ds = Datastore(MemoryProvider(owned={"203.0.113.1"}), default_codec(), Journal(directory))
    entries = [EditEntry("merge", s.key, {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None}) for s in sessions]
    ds.edit("candidate", EditRequest(entries), sid=1)
    t = time.perf_counter()
    ds.commit(1, confirmed=confirmed)
    took = time.perf_counter() - t
    ds.close()
    return took


def main() -> int:
    logging.disable(logging.WARNING)  # each run's close() logs its rollback
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        journal = Journal(directory)
        for n in (10_000, 100_000):
            sessions = synthetic_table(n)
            record = Record(Undo(created={s.key for s in sessions}), None, time.time() + 600)
            write = median_time(lambda: journal.save(record))
            size = (directory / Journal.NAME).stat().st_size
            journal.remove()
            plain = min(_commit_time(sessions, directory, False) for _ in range(3))
            confirmed = min(_commit_time(sessions, directory, True) for _ in range(3))
            rows.append([f"{n:,}", f"{write * 1000:.0f} ms", f"{size / 1e6:.1f} MB", f"{plain * 1000:.0f} ms", f"{confirmed * 1000:.0f} ms"])
    print_table("confirmed commit (MemoryProvider)", ["created", "record write", "record size", "commit", "confirmed commit"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
