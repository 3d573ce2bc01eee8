"""Shipped config templates: list them, find one by name, copy one out (`NAME_copy.py`)."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from tokentrain.errors import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "configs" / "templates"


def list_templates(pattern: str | None = None) -> list[str]:
    """Template names (file stems), sorted; `pattern` is a substring or a shell glob."""
    names = sorted(p.stem for p in TEMPLATE_DIR.glob("*.py") if not p.name.startswith("_"))
    if pattern:
        glob = any(c in pattern for c in "*?[")
        names = [n for n in names if (fnmatch.fnmatch(n, pattern) if glob else pattern.lower() in n.lower())]
    return names


def template_path(name: str) -> Path:
    name = name[:-3] if name.endswith(".py") else name
    p = TEMPLATE_DIR / f"{name}.py"
    if not p.is_file():
        from tokentrain.config.loader import did_you_mean

        raise ConfigError(
            f"no config template named {name!r}{did_you_mean(name, list_templates())}; see `tokentrain list-cfg`"
        )
    return p


def copy_template(name: str, dest_dir: str | Path) -> Path:
    """Copy template `name` to `dest_dir/NAME_copy.py` and return that path."""
    src = template_path(name)
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise ConfigError(f"{dest_dir}: not a folder")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{src.stem}_copy.py"
    shutil.copyfile(src, dest)
    return dest
