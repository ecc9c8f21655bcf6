"""The import graph says what depends on what: checked on the source, without importing it.

The controller reaches an agent over NETCONF only, so no controller module
imports agent code (what both need lives in natmig/), but for the controller
service's northbound, which is a NETCONF server on the agent's server layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, relative imports resolved against its installed package."""
    pkg = {"natmig": "natmig", "wire": "natmig.wire", "agent": "natmig.agent", "controller": "natmig.controller", "testbed": "natmig.testbed"}[path.parent.name]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


#: The controller service's NETCONF northbound is a NETCONF server: it is built on the
#: agent's server layer (SSH, sessions, framing, hello, get-schema, subscriptions), as
#: its issue asks, and so is the service that starts it.  Nothing else of the
#: controller -- the migrations, their client, the planner -- may import agent code.
SERVER_SIDE = {"northbound.py", "service.py"}


def test_the_controller_imports_no_agent_code() -> None:
    offenders = {f"{p.name}: {m}" for p in sorted((ROOT / "controller").glob("*.py")) if p.name not in SERVER_SIDE
                 for m in _imports(p) if m == "natmig.agent" or m.startswith("natmig.agent.")}
    assert not offenders, sorted(offenders)


def test_the_migration_engines_do_not_import_the_controller_service() -> None:
    # The service uses the engines; the engines know nothing of it (nor of the server layer).
    nat = sorted(p.name for p in (ROOT / "controller").glob("mig*.py"))
    assert "migrate.py" in nat and "migverify.py" in nat  # the NAT migration's modules are found
    for name in ("engine.py", "enginecontext.py", "enginecatchup.py", "phase.py", *nat, "statenode.py", "txn.py", "plan.py"):
        bad = {m for m in _imports(ROOT / "controller" / name) if m.split(".")[-1] in {"service", "northbound", "registry"} or m.startswith("natmig.agent")}
        assert not bad, (name, sorted(bad))


def test_relative_imports_are_resolved() -> None:
    # The check above is only as good as the resolution of ``from ..x import y``.
    assert "natmig.credentials" in _imports(ROOT / "controller" / "agentfleet.py")
    assert "natmig.agent.auth" in _imports(ROOT / "agent" / "server.py")


def test_only_natmig_netns_enters_a_namespace():
    # No other source file opens /run/netns/<name> or calls setns(2): one helper, one error type.
    offenders = [str(p.relative_to(ROOT)) for d in ("natmig", "natmig/wire", "agent", "controller", "testbed") for p in sorted((ROOT / d).glob("*.py"))
                 if p != ROOT / "natmig" / "netns.py" and ("/run/netns" in p.read_text() or "setns" in p.read_text())]
    assert not offenders, offenders


#: The generic engine and what it is made of: none may know a network function.
ENGINE = ["controller/engine.py", "controller/enginecontext.py", "controller/enginecatchup.py", "controller/phase.py", "controller/statenode.py", "controller/enginereport.py", "controller/registry.py",
          "controller/callhome.py", "natmig/statemodel.py", "natmig/wire/state.py"]
#: Names of network functions, of their modules and of their kernel state.
_NF = __import__("re").compile(r"(?i)(?<![a-z])(nat|nats|snat|dnat|natsession|nat_session|nat-session|nat-control|nat-statistics|"
                               r"firewall|fw|fw-state|fwnode|conntrack|ctnetlink|nftables|lb-binding)(?![a-z])")


def _identifiers_and_strings(path: Path) -> set[str]:
    """Every name, attribute, argument, imported module and string constant of a file, but docstrings (prose may compare)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out.add(n.name)
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            out.add(n.value)
    return out


def test_the_generic_engine_names_no_network_function() -> None:
    for rel in ENGINE:
        # snake_case and dotted names split into words: `nat_port` and `natmig.x` are judged word by word.
        words = {w for s in _identifiers_and_strings(ROOT / rel) for w in __import__("re").split(r"[^A-Za-z-]+|_|\.", s) if w}
        bad = sorted(w for w in words if _NF.fullmatch(w))
        assert not bad, (rel, bad)


def test_the_check_finds_a_network_function_name(tmp_path: Path) -> None:
    # The check above must be able to fail: the NAT's own migration (its verify, say) is full of such names.
    words = {w for s in _identifiers_and_strings(ROOT / "controller" / "migverify.py") for w in __import__("re").split(r"[^A-Za-z-]+|_|\.", s) if w}
    assert any(_NF.fullmatch(w) for w in words)


def test_the_wire_layer_imports_neither_side() -> None:
    # Both the agent and the controller read and write through natmig/wire: it may know neither.
    offenders = {f"{p.name}: {m}" for p in sorted((ROOT / "natmig" / "wire").glob("*.py"))
                 for m in _imports(p) if m.startswith(("natmig.agent", "natmig.controller", "natmig.testbed"))}
    assert not offenders, sorted(offenders)
