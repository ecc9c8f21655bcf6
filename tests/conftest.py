"""Shared test set-up: the `root` marker and a guard for tests that need the real kernel."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Functional tests need root (namespaces, conntrack, Open vSwitch).  CI is
    # root and runs them all; a developer without root sees them as skipped,
    # with the reason, never as passed.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces and the real kernel")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
