"""The manual page and completions build from the parsers, render cleanly, are up to date; `make help` names every target."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from natmig import manual

ROOT = Path(__file__).resolve().parents[1]


def test_the_man_page_builds_with_every_command_and_the_exit_statuses() -> None:
    page = manual.man_page(date="2026-01-01")
    assert page.startswith('.TH NATMIG "1" "2026\\-01\\-01" "natmig '), page[:80]
    for command in ("validate", "convert", "agent", "agent passwd", "agent keygen", "migrate", "recover", "demo",
                    "testbed up", "node", "node status", "node sessions", "node admission", "node load", "node flush"):
        assert f"COMMAND \\fI\\,'natmig {command}'" in page or f"'natmig {command}'" in page, command
    assert ".SH EXIT STATUS" in page and "needs attention" in page and "--config" in page.replace("\\-", "-")


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_the_man_page_renders_without_warnings(tmp_path: Path) -> None:
    (tmp_path / "natmig.1").write_text(manual.man_page())
    cp = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "natmig.1")], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr


def test_the_generated_files_are_up_to_date() -> None:
    # Stale ones: run `make man` (they are generated, never edited by hand).
    assert manual.main(["--check"]) == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_bash_completion_completes_subcommands_and_node_actions() -> None:
    script = (ROOT / "completion" / "natmig").read_text()

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        cmd = (f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
               f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; _shtab_natmig; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30).stdout.split()

    assert {"migrate", "recover", "node", "agent", "validate"} <= set(complete("natmig "))
    assert "--inventory" in complete("natmig migrate --inv")


def test_make_help_names_every_target() -> None:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):(?!=)", text, re.M))
    listed = set(re.findall(r"make ([a-z][a-z-]*)", subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout))
    assert targets - listed == set(), targets - listed
