"""Every module imports on its own (no import cycle hides behind an import order that happens
to work), and `distributed/` holds launch topology only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "tokentrain"
MODULES = sorted(
    ".".join(("tokentrain", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for p in SRC.rglob("*.py")
    if p.name != "__main__.py" and "configs" not in p.parts
)


# In a child interpreter: importing modules alone after dropping tokentrain's from
# sys.modules re-runs registrations (transformers' AttentionInterface, ...) that other
# tests of this process rely on.
CHILD = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for k in [k for k in sys.modules if k == "tokentrain" or k.startswith("tokentrain.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    r = subprocess.run([sys.executable, "-c", CHILD, *MODULES], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert len(MODULES) > 60


def test_distributed_is_launch_topology_only():
    assert sorted(p.name for p in (SRC / "distributed").glob("*.py")) == ["__init__.py", "env.py", "spawn.py"]


def _imports(path: Path) -> set[str]:
    """The tokentrain modules one file imports, at its top or inside a function (a lazy import
    is still a tie: two modules that need each other are one piece cut in two)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokentrain"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from tokentrain.x import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tokentrain"))
    return found & set(MODULES)


def test_no_two_modules_import_each_other_in_a_circle():
    graph = {
        m: _imports(SRC.joinpath(*m.split(".")[1:]).with_suffix(".py")) - {m}
        for m in MODULES
        if SRC.joinpath(*m.split(".")[1:]).with_suffix(".py").is_file()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                circles.append(" -> ".join([*path[path.index(n) :], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []
