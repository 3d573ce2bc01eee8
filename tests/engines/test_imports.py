"""Every module imports on its own (no import cycle hides behind an import order that happens
to work), and `distributed/` holds launch topology only."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tokentrain"
MODULES = sorted(
    ".".join(("tokentrain", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for p in SRC.rglob("*.py")
    if p.name != "__main__.py" and "configs" not in p.parts
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone(name):
    saved = {k: v for k, v in sys.modules.items() if k == "tokentrain" or k.startswith("tokentrain.")}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    finally:
        for k in [k for k in sys.modules if k == "tokentrain" or k.startswith("tokentrain.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_distributed_is_launch_topology_only():
    assert sorted(p.name for p in (SRC / "distributed").glob("*.py")) == ["__init__.py", "env.py", "spawn.py"]
