"""The conntrack -E reader's stderr: a loss of events the tool survives is logged and counted, its notices are not."""

from __future__ import annotations

import logging
import subprocess

import pytest

from natmig.agent.ctwatch import _ConntrackWatch


def _reading(stderr_text: str) -> _ConntrackWatch:
    w = object.__new__(_ConntrackWatch)  # no conntrack process: only its stderr reader is under test
    w.netns, w.lost = "nsx", 0
    w.proc = subprocess.Popen(["sh", "-c", f"printf '{stderr_text}' >&2"], stderr=subprocess.PIPE, text=True)
    return w


def test_an_event_loss_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    w = _reading("NOTICE: Netlink socket buffer size has been set to 134217728 bytes.\\n"
                 "WARNING: We have hit ENOBUFS! We are losing events.\\n"
                 "This message means that the current netlink socket buffer size is too small.\\n")
    with caplog.at_level(logging.INFO, logger="natmig.agent.ctwatch"):
        w._complaints()
    w.proc.wait()
    assert w.lost == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nsx" in warnings[0] and "dropped events" in warnings[0]
    assert not any("NOTICE" in r.getMessage() for r in caplog.records)


def test_notices_alone_are_no_loss(caplog: pytest.LogCaptureFixture) -> None:
    w = _reading("NOTICE: Netlink socket buffer size has been set to 134217728 bytes.\\n")
    with caplog.at_level(logging.INFO, logger="natmig.agent.ctwatch"):
        w._complaints()
    w.proc.wait()
    assert w.lost == 0 and not caplog.records
