"""The module itself: it lints, libyang accepts it, the README's tree is its tree,
and the committed bindings are what pyangbind makes of it today."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from pathlib import Path

import pyangbind
import pytest

from natmig.model import FIELD_NAMES
from natmig.schema import MODULE_PATH, load_schema

ROOT = Path(__file__).resolve().parent.parent
PYANG = str(Path(sys.executable).with_name("pyang"))


#: every module natmig ships: nat-session, the common natmig-state, the controller's northbound, the firewall's fw-state, the example state module.
MODULES = [MODULE_PATH, ROOT / "yang" / "natmig-state.yang", ROOT / "yang" / "natmig-controller.yang", ROOT / "yang" / "fw-state.yang",
           ROOT / "examples" / "lb-binding.yang"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_pyang_lint_reports_nothing(path: Path) -> None:
    cp = subprocess.run([PYANG, "--lint", "-p", str(ROOT / "yang"), str(path)], capture_output=True, text=True)
    assert cp.returncode == 0 and cp.stdout + cp.stderr == "", cp.stdout + cp.stderr


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_yanglint_accepts_module(path: Path) -> None:
    cp = subprocess.run(["yanglint", "-p", str(ROOT / "yang"), str(path)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_node_has_a_description(path: Path) -> None:
    from pyang import context, repository

    ctx = context.Context(repository.FileRepository(str(ROOT / "yang") + os.pathsep + os.path.join(sys.prefix, "share", "yang", "modules"), use_env=False))
    mod = ctx.add_module(str(path), path.read_text())
    ctx.validate()
    missing = []
    todo = list(mod.substmts)
    while todo:
        st = todo.pop()
        if st.keyword in ("container", "list", "leaf", "leaf-list", "notification", "anydata", "typedef", "grouping", "enum", "revision", "module", "extension"):
            if st.search_one("description") is None:
                missing.append(f"{st.keyword} {st.arg}")
        todo.extend(st.substmts)
    assert missing == []


def test_readme_tree_diagram_matches_module() -> None:
    tree = subprocess.run([PYANG, "-f", "tree", str(MODULE_PATH)], capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- tree:begin -->\n```\n(.*?)```\n<!-- tree:end -->", readme, re.S)
    assert m, "README.md has no tree diagram between <!-- tree:begin --> and <!-- tree:end -->"
    assert m.group(1).strip() == tree.strip(), "README tree diagram is stale: paste `make tree` output"


@pytest.mark.parametrize("module, name", [(MODULE_PATH, "nat_session.py"), (ROOT / "yang" / "fw-state.yang", "fw_state.py")], ids=["nat-session", "fw-state"])
def test_bindings_are_up_to_date(tmp_path: Path, module: Path, name: str) -> None:
    out = tmp_path / name
    plugin = Path(pyangbind.__file__).parent / "plugin"
    subprocess.run(
        [PYANG, "--plugindir", str(plugin), "-f", "pybind", "-p", str(ROOT / "yang"), "-o", str(out), str(module)],
        check=True, capture_output=True, env={**os.environ},
    )
    committed = ROOT / "bindings" / name
    assert filecmp.cmp(out, committed, shallow=False), "bindings/ is out of date with yang/: run `make bindings`"


def test_schema_and_record_agree() -> None:
    schema = load_schema()
    assert tuple(s.name for s in schema.leaves) == FIELD_NAMES
    assert schema.keys == ("protocol", "src_address", "src_port", "dst_address", "dst_port")
    assert schema.revision and schema.namespace == "urn:natmig:yang:nat-session"
    # The slide's leaves are all there under their original names.
    for name in ("protocol", "src_address", "src_port", "translated_address", "translated_port"):
        assert name in FIELD_NAMES


def test_schema_follows_the_module(tmp_path: Path) -> None:
    # Narrow a range in a copy of the module: the compiled validator must follow.
    text = MODULE_PATH.read_text().replace('range "0..65535";', 'range "1024..65535";')
    assert 'range "1024..65535";' in text
    copy = tmp_path / "nat-session.yang"
    copy.write_text(text)
    spec = load_schema(str(copy)).leaf["src_port"]
    assert spec.parse("1024") == 1024
    try:
        spec.parse("80")
    except ValueError as e:
        assert "80 is not in range 1024..65535" in str(e)
    else:
        raise AssertionError("narrowed range not enforced")
