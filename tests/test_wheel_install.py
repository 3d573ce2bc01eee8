"""The package as a user installs it: the built wheel in a fresh venv, used from an empty folder.

The venv gets only the wheel (`--no-deps`); its dependencies (torch, transformers, ...) come
from the test venv through a path entry, so nothing is downloaded and the checkout is not
importable: templates, DeepSpeed presets and every module must be inside the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_quickstart_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    r = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        tmp_path,
        dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("tokentrain-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], tmp_path, clean)
    assert r.returncode == 0, r.stderr[-2000:]
    # Then the dependencies, as a plain path entry after the venv's own site-packages (its .pth
    # files, such as the checkout's editable install, are not processed from there).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    user = tmp_path / "user"
    user.mkdir()
    env = dict(clean)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    tt = str(venv / "bin" / "tokentrain")
    where = _run([str(py), "-c", "import tokentrain; print(tokentrain.__file__)"], user, env)
    assert str(site) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout

    r = _run([tt, "copy-cfg", "tiny_demo", "."], user, env)
    assert r.returncode == 0, r.stderr
    cfg = user / "tiny_demo_copy.py"
    # The template names the checkout's demo model: outside it, one line pointing to `tokentrain demo`.
    r = _run([tt, "train", str(cfg), "--cfg-options", "max_iters=1"], user, env, timeout=120)
    assert r.returncode == 2 and "tokentrain demo DIR" in r.stderr and "Traceback" not in r.stderr, r.stderr

    # The quickstart outside the checkout is the checkout's demo: `tokentrain demo`, then train.
    r = _run([tt, "demo", "."], user, env)
    assert r.returncode == 2 and "--force" in r.stderr  # the copied config is not overwritten silently
    r = _run([tt, "demo", ".", "--force"], user, env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (user / "demo" / "tiny-llama" / "tokenizer.json").is_file() and (user / "demo_out" / "data").is_dir()
    r = _run(
        [tt, "train", str(cfg), "--work-dir", "work", "--cfg-options", "max_iters=2", "max_length=64",
         "evaluation_inputs=[]", "dataloader_num_workers=0", "tensorboard=False"],
        user,
        env,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (user / "work" / "hf" / "config.json").is_file()
    # A DeepSpeed preset shipped in the wheel resolves (the preset files are package data).
    r = _run([str(py), "-c", "from tokentrain.engines.deepspeed_config import preset_names; print(preset_names())"],
             user, env)  # fmt: skip
    assert "deepspeed_zero3" in r.stdout, r.stdout + r.stderr
