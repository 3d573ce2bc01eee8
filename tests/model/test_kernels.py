"""`kernels`: Liger's fused kernels where they can run (CUDA, installed, a family they patch), the
plain PyTorch path elsewhere -- said in one log line -- and, on CUDA, the same losses and
gradients as the plain path."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokentrain.model.kernels import INSTALL, Kernels, apply_kernels, choose_kernels, liger_families

from ..helpers import make_config, metrics, train
from .families import model, pack

ROOT = Path(__file__).resolve().parents[2]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed to name one
LIGER = liger_families()


def test_auto_takes_pytorch_where_liger_cannot_run_and_says_why():
    k = choose_kernels("auto", CPU, "llama")
    assert k == Kernels("torch", "PyTorch's: Liger's kernels are Triton, CUDA only (device here: cpu)")
    k = choose_kernels("auto", CUDA, "llama")
    if isinstance(LIGER, str):  # not installed (as here, in CI): the plain path, and how to get Liger
        assert not k.liger and "liger-kernel is not importable" in k.why and INSTALL in k.why
    else:
        assert k.liger and k.why.startswith("liger-kernel ")
        k = choose_kernels("auto", CUDA, "gpt2")  # a family Liger does not patch
        assert k == Kernels("torch", "PyTorch's: liger-kernel has no kernels for model type 'gpt2'")
    assert choose_kernels("torch", CUDA, "llama") == Kernels("torch", "kernels = 'torch'")


def test_liger_demanded_where_it_cannot_run_is_one_config_error():
    from tokentrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^kernels = 'liger': Liger's kernels are Triton, CUDA only .*'torch'$"):
        choose_kernels("liger", CPU, "llama")
    with pytest.raises(ConfigError, match="must be one of auto, liger, torch"):
        choose_kernels("triton", CPU, "llama")


def test_the_trainer_logs_its_kernels_and_trains_on_the_plain_path(tiny_model, tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tokentrain")
    assert train(make_config(tiny_model, tiny_data, max_iters=2), tmp_path / "work") == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels: ")]
    assert lines == ["kernels: torch (PyTorch's: Liger's kernels are Triton, CUDA only (device here: cpu))"]
    assert [m["step"] for m in metrics(tmp_path / "work") if "loss" in m] == [1, 2]


def test_kernels_liger_on_cpu_stops_the_cli_in_one_line(tiny_model, tiny_data, tmp_path):
    conf = tmp_path / "train.py"
    conf.write_text(f"pretrained_model_name_or_path = {str(tiny_model)!r}\ndataset_folder = {str(tiny_data)!r}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(
        [sys.executable, "-m", "tokentrain", "train", str(conf), "--work-dir", str(tmp_path / "w")]
        + ["--cfg-options", "kernels=liger", "max_iters=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "kernels = 'liger': Liger's kernels are Triton, CUDA only (device here: cpu)" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def modeling_restored():
    """Liger patches a family's modeling module (RoPE, RMSNorm and MLP classes) for the whole
    process: put each back after the test, so later tests build the plain modules."""
    names = [f"transformers.models.{f}.modeling_{f}" for f in ("llama", "mistral", "qwen2")]
    saved = {n: dict(vars(importlib.import_module(n))) for n in names}
    yield
    for n, d in saved.items():
        vars(sys.modules[n]).update(d)


@pytest.mark.skipif(
    isinstance(LIGER, str) or not torch.cuda.is_available(), reason="Liger's Triton kernels run on CUDA only"
)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_cuda_liger_equals_the_plain_path_in_loss_and_gradients(family, modeling_restored):
    """fp32 on CUDA, two packed rows, sdpa + document mask: Liger's RMSNorm, SwiGLU, RoPE and
    fused linear cross-entropy give the plain path's summed loss and every gradient."""
    from tokentrain.model.attention import DocMasking, attention_windows
    from tokentrain.model.lm import CausalLMWithLoss

    _, ids, pos, cu = pack(97)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # masked targets cost nothing on both paths
    results = []
    for liger in (False, True):
        m = model(family, "sdpa", seed=3).to(CUDA).train()
        if liger:
            apply_kernels(m, choose_kernels("liger", CUDA, family))
        lm = CausalLMWithLoss(m, DocMasking("mask4d", "sdpa", attention_windows(m.config)), None, liger=liger)
        assert lm.fused
        loss = lm(ids.to(CUDA), labels.to(CUDA), pos.to(CUDA), cu.to(CUDA))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}))
    (plain, g0), (fused, g1) = results
    assert torch.allclose(fused, plain, rtol=1e-5, atol=0), (fused.item(), plain.item())
    for n, g in g0.items():
        assert torch.allclose(g1[n], g, rtol=1e-4, atol=1e-5), (n, float((g1[n] - g).abs().max()))


@pytest.mark.slow
def test_the_gpu_speed_benchs_cpu_plumbing_run(tmp_path):
    """bench/gpu_speed.sh runs only where a GPU is lent; its `--tiny` CPU run keeps each kind of
    part alive: the matmul, the plain loop, the trainer's best path, the 8B shape under FSDP2."""
    env = {**os.environ, "PYTHON": sys.executable, "LIGER_WHEELS": str(tmp_path / "none")}
    parts = "matmul,peer-amp,tokentrain,8b-fsdp2"
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_speed.sh"), "--tiny", "--parts", parts, "--workdir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout.splitlines()
    assert "no wheel in" in out[0]  # no Liger here: said, and the run goes on
    assert any(x.startswith("command: ") and "gpu_speed.py --tiny" in x for x in out)  # what made the figures
    rows = {x.split(" | ")[0][2:]: x for x in out if x.startswith("| ") and "tokens/s" not in x}
    assert sorted(rows) == ["8b-fsdp2", "peer-amp", "tokentrain"], r.stdout
    assert all(float(x.split(" | ")[1]) > 0 for x in rows.values())  # tokens/s measured
    assert any("kernels: torch (PyTorch's: Liger's kernels are Triton, CUDA only" in x for x in out)
    assert any("engine=fsdp2" in x and "FSDP" in x for x in out)
    assert "gpu speed: 4 of 4 parts ran" in r.stdout
