"""`tokentrain demo DIR`: the checkout's demo, anywhere the package is installed.

The `tiny_demo` template names `demo/tiny-llama` and `demo_out/data`, relative paths that
exist in a source checkout after `make demo`. Installed from a wheel there is no checkout, so
this writes the same layout into DIR from the files the package ships (the demo's
config-only model with its tokenizer and chat template, and its chat data, tokenized here):
`cd DIR && tokentrain train tiny_demo_copy.py` is then exactly the checkout's demo run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tokentrain.errors import ConfigError
from tokentrain.utils.paths import shown

ASSETS = Path(__file__).resolve().parent.parent / "configs" / "demo"
MODEL = Path("demo") / "tiny-llama"  # where the tiny_demo template looks, relative to DIR
CHAT = Path("demo") / "data" / "chat.jsonl"
DATA = Path("demo_out") / "data"
CONFIG = "tiny_demo_copy.py"


def write_demo(dest: str | Path, force: bool = False) -> Path:
    """Write the demo's model, data and config into `dest`; return the config's path. Refuses
    to replace any of them without `force` (they may be edited or trained on)."""
    from tokentrain.config.templates import copy_template
    from tokentrain.tools.tokenize import TokenizeOptions, tokenize_files

    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{shown(dest)}: not a folder; give a new or existing folder for the demo")
    present = [p for p in (MODEL, CHAT, DATA, Path(CONFIG)) if (dest / p).exists()]
    if present and not force:
        raise ConfigError(
            f"{shown(dest / present[0])} exists (an earlier demo, maybe edited); give another folder, or --force"
        )
    for p in (MODEL, DATA):
        shutil.rmtree(dest / p, ignore_errors=True)
    (dest / CHAT.parent).mkdir(parents=True, exist_ok=True)
    shutil.copytree(ASSETS / "tiny-llama", dest / MODEL)
    shutil.copyfile(ASSETS / "chat.jsonl", dest / CHAT)
    tokenize_files([dest / CHAT], TokenizeOptions(tokenizer=str(dest / MODEL), out=str(dest / DATA), progress=False))
    return copy_template("tiny_demo", dest)
