"""natmig as a wheel: built, installed (not editable) into a fresh venv, and run from there.

The installed copy must find its YANG module and the testbed's topologies
without the source tree (they are package data), and ship ``py.typed``.
The README's JSON example is what ``natmig validate`` checks.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _readme_json_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```json\n(\{.*?\n\})\n```", text, re.S)
    assert m, "the README has no JSON example"
    return m.group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from this venv (offline)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    wheel = next(tmp.glob("natmig-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=120)
    # The dependencies (pyang, lxml, ...) from this venv's site-packages: a plain
    # path entry, so this venv's editable finder of natmig is not activated.
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "natmig-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pyang installs the IETF modules as data files under its prefix
    # (share/yang/modules), where natmig's schema looks: as pip would have put them.
    (venv / "share").mkdir(exist_ok=True)
    (venv / "share" / "yang").symlink_to(Path(sys.prefix) / "share" / "yang")
    return venv


def test_the_installed_wheel_carries_its_module_topologies_and_py_typed(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import natmig, natmig.schema as s, natmig.testbed.topology as t, pathlib;"
         "print(natmig.__file__); print(s.MODULE_PATH); print(t.DEFAULT_TOPOLOGY);"
         "print((pathlib.Path(natmig.__file__).parent / 'py.typed').is_file())"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    pkg, module, topology, typed = out[:4]
    assert str(installed) in pkg, f"natmig imported from {pkg}, not from the installed wheel"
    assert str(installed) in module and Path(module).is_file()
    assert str(installed) in topology and Path(topology).is_file()
    assert typed == "True"


def test_the_installed_command_validates_the_readme_example_and_has_the_testbed(installed: Path, tmp_path: Path) -> None:
    doc = tmp_path / "example.json"
    doc.write_text(_readme_json_example())
    cp = subprocess.run([str(installed / "bin" / "natmig"), "validate", str(doc)], cwd=tmp_path, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(_readme_json_example().replace('"translated_port": 5678', '"translated_port": 70000'))
    cp = subprocess.run([str(installed / "bin" / "natmig"), "validate", str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert cp.returncode != 0 and "70000" in cp.stdout + cp.stderr
    cp = subprocess.run([str(installed / "bin" / "natmig"), "testbed", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert cp.returncode == 0 and "testbed" in cp.stdout
