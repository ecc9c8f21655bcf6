"""conntrackd's private configuration and its cache statistics, without root."""

from __future__ import annotations

from pathlib import Path

import pytest

from natmig.testbed.conntrackd import ConntrackdError, CacheCounts, config_text, parse_cache_stats

STATS = (
    "cache:internal\tactive objects:\t\t        1000\n\tactive/total entries:\t\t        1000/        1000\n"
    "\tcreation OK/failed:\t\t        1000/           0\n\n"
    "cache:external\tactive objects:\t\t          37\n\tactive/total entries:\t\t          37/          37\n"
)


def test_cache_stats_give_both_caches() -> None:
    assert parse_cache_stats(STATS) == CacheCounts(1000, 37)


def test_cache_stats_without_a_cache_are_refused() -> None:
    with pytest.raises(ConntrackdError, match="both caches"):
        parse_cache_stats(STATS.split("cache:external")[0])


def test_config_keeps_every_file_under_home_and_syncs_over_the_veth() -> None:
    text = config_text(Path("/run/natmig/x/ctd"), "b", "198.51.100.2", "198.51.100.1", ignore=("192.0.2.0/24",))
    for name in ("LogFile /run/natmig/x/ctd/b.log", "LockFile /run/natmig/x/ctd/b.lock", "Path /run/natmig/x/ctd/b.sock"):
        assert name in text
    assert "Systemd off" in text and "Mode FTFW" in text
    assert "IPv4_address 198.51.100.2" in text and "IPv4_Destination_Address 198.51.100.1" in text
    # Its own sync flow, loopback and what the caller names are never mirrored.
    for ignored in ("127.0.0.1", "198.51.100.0/24", "192.0.2.0/24"):
        assert f"IPv4_address {ignored}\n" in text.split("Address Ignore")[1].split("}")[0]
    assert "/etc/" not in text and "/var/" not in text
