"""Every `torch.load` in src/ asks for ``weights_only=True`` (read from the source, not the docs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "tokentrain"


def _is_torch_load(func: ast.expr) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "load"
        and ast.unparse(func.value)
        in (
            "torch",
            "torch.serialization",
        )
    )


def test_every_torch_load_in_src_is_weights_only():
    bad, seen = [], 0
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and _is_torch_load(node.func):
                seen += 1
                kw = {k.arg: k.value for k in node.keywords}
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
        # a call spelled otherwise (from torch import load, getattr) would hide from the walk above
        assert not re.search(r"from torch(\.serialization)? import .*\bload\b", text), path
    assert seen >= 4, "the walk found the known calls"
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)
