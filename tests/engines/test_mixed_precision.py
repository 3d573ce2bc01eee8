"""`mixed_precision = 'params'` (bf16 compute parameters, fp32 masters, fp32 gradient reduction)
against 'autocast', on the real CLI with bf16 on CPU: local, DDP at 2 ranks, FSDP2 at 1 and 2
ranks, DeepSpeed ZeRO-2 at 2 ranks. Each trains with a loss close to autocast's, writes fp32
checkpoints, a resume from the middle continues bit-identically (losses and final parameters),
and the export is the fp32 masters. In process: the parameters the model computes with are bf16
while the optimizer steps fp32 ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engines.engine_helpers import clean_env, losses, tokentrain, write_cfg
from tests.engines.test_fsdp2_engine import adamw, loss_module
from tests.helpers import config_only

ROOT = Path(__file__).resolve().parents[2]
RUNS = {  # case: (how the engine is chosen, ranks)
    "local": (["--engine", "local"], 1),
    "ddp": (["--engine", "ddp"], 2),
    "fsdp2_1": (["--engine", "fsdp2"], 1),
    "fsdp2_2": (["--engine", "fsdp2"], 2),
    "deepspeed_zero2": (["--deepspeed", "deepspeed_zero2"], 2),
}
CASES = [
    pytest.param("local"),
    pytest.param("ddp", marks=pytest.mark.distributed),
    pytest.param("fsdp2_1", marks=pytest.mark.distributed),
    pytest.param("fsdp2_2", marks=pytest.mark.distributed),
    pytest.param("deepspeed_zero2", marks=[pytest.mark.distributed, pytest.mark.deepspeed]),
]


FAST = dict(lr=3e-3, warm_up_ratio=0.0)  # updates large enough that a wrong one shows in the losses


class Runs:
    """The demo model from scratch on synthetic data; each run made once and shared by the
    tests: 4 steps of 2 micro-batches, a checkpoint every 2."""

    def __init__(self, root: Path):
        from tokentrain.data.synth import synth_dataset

        self.root = root
        self.model = config_only(ROOT / "demo" / "tiny-llama", root / "model")
        self.data = root / "data"
        synth_dataset(self.data, files=1, documents=120, seed=3, mean_length=40, vocab_size=768)
        self.done: dict[Path, str] = {}  # work dir -> its log

    def run(self, case: str, mode: str, resume_from: Path | None = None) -> tuple[Path, str]:
        work = self.root / (
            f"{case}_{mode}" if resume_from is None else f"{case}_{mode}_from_{resume_from.parent.parent.name}"
        )
        if work in self.done:
            return work, self.done[work]
        flags, ranks = RUNS[case]
        cfg = write_cfg(
            self.root / f"{case}_{mode}.py", self.model, self.data, dtype="bfloat16", mixed_precision=mode, **FAST
        )
        resume = ["--resume", resume_from] if resume_from is not None else []
        extra = {"NPROC_PER_NODE": str(ranks)} if ranks > 1 else {}
        r = tokentrain("train", cfg, "--work-dir", work, *flags, *resume, env=clean_env(**extra))
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
        self.done[work] = r.stdout + r.stderr
        return work, self.done[work]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("mixed"))


def model_state(step: Path) -> dict:
    from tokentrain.engines.registry import read_model_state

    return read_model_state(step)


def checkpoint_dtypes(step: Path) -> set[torch.dtype]:
    """The dtypes of the tensors a checkpoint holds: weights and optimizer state (DeepSpeed: its
    reader consolidates the fp32 partitions of its optimizer, the masters)."""
    dtypes = {v.dtype for v in model_state(step).values()}
    if (step / "optimizer.pt").is_file():
        state = torch.load(step / "optimizer.pt", weights_only=True)["state"]
        dtypes |= {t.dtype for s in state.values() for t in s.values() if t.is_floating_point() and t.dim()}
    elif (step / "fsdp").is_dir():
        from tokentrain.engines.fsdp2_checkpoint import read_metadata

        md = read_metadata(step / "fsdp")
        dtypes |= {v.properties.dtype for k, v in md.state_dict_metadata.items() if v.size and len(v.size)}
    return dtypes


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_params_mode_trains_like_autocast_keeps_fp32_checkpoints_and_resumes_bit_identically(runs, case):
    params, log = runs.run(case, "params")
    assert "bfloat16 compute parameters, fp32 master weights" in log
    autocast, log_a = runs.run(case, "autocast")
    assert "fp32 parameters, bfloat16 autocast" in log_a

    lp, la = losses(params), losses(autocast)
    assert len(lp) == len(la) == 4
    assert lp == pytest.approx(la, rel=5e-3)  # bf16 rounding apart, the same training

    ckpts = params / "checkpoints"
    assert checkpoint_dtypes(ckpts / "step_2") == {torch.float32}

    resumed, _ = runs.run(case, "params", resume_from=ckpts / "step_2")
    assert losses(resumed) == lp[2:]  # bit-identical continuation
    final, again = model_state(ckpts / "step_4"), model_state(resumed / "checkpoints" / "step_4")
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert all(v.dtype == torch.float32 for v in final.values())

    from safetensors.torch import load_file

    export = load_file(str(params / "hf" / "model.safetensors"))  # the fp32 masters, exported
    assert all(torch.equal(export[k], final[k]) for k in export)


@pytest.mark.slow
def test_a_checkpoint_of_one_mode_resumes_in_the_other(runs):
    """The same files either way (fp32 weights, the optimizer state of the fp32 parameters)."""
    autocast, _ = runs.run("local", "autocast")
    switched, log = runs.run("local", "params", resume_from=autocast / "checkpoints" / "step_2")
    assert "bfloat16 compute parameters" in log
    assert losses(switched) == pytest.approx(losses(autocast)[2:], rel=5e-3)
    assert checkpoint_dtypes(switched / "checkpoints" / "step_4") == {torch.float32}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_a_deepspeed_checkpoint_of_one_mode_resumes_in_the_other(runs):
    """ZeRO's bf16 optimizer (params) and its fp32 one (autocast) read each other's checkpoints,
    both ways."""
    autocast, _ = runs.run("deepspeed_zero2", "autocast")
    params, _ = runs.run("deepspeed_zero2", "params")
    for written, mode in ((autocast, "params"), (params, "autocast")):
        switched, log = runs.run("deepspeed_zero2", mode, resume_from=written / "checkpoints" / "step_2")
        assert ("bfloat16 compute parameters" in log) == (mode == "params"), mode
        assert "holds the other mixed_precision mode's optimizer" in log and "universal checkpoint" in log, mode
        assert losses(switched) == pytest.approx(losses(written)[2:], rel=5e-3), mode
        final = model_state(switched / "checkpoints" / "step_4")
        assert all(v.dtype == torch.float32 for v in final.values()), mode


@pytest.mark.slow
@pytest.mark.distributed
def test_an_fsdp2_params_checkpoint_resumes_on_the_local_engine(runs):
    """FSDP2's sharded fp32 masters and Adam state go into the local engine's masters: its steps
    3-4 are the FSDP2 run's (one rank each: the global batch is the same)."""
    sharded, _ = runs.run("fsdp2_1", "params")
    moved, log = runs.run("local", "params", resume_from=sharded / "checkpoints" / "step_2")
    assert "bfloat16 compute parameters" in log and "FSDP2" in log
    assert losses(moved) == pytest.approx(losses(sharded)[2:], rel=1e-3)
    want, got = model_state(sharded / "checkpoints" / "step_4"), model_state(moved / "checkpoints" / "step_4")
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=2e-3) for k in want)


# ------------------------------------------------------------------ in process


def module_bf16():
    module = loss_module()
    module.compute_dtype = torch.bfloat16
    return module


def batch():
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    return ids, ids.roll(-1, 1), torch.arange(16)[None]


def compute_dtypes(engine, steps: int = 2) -> set[torch.dtype]:
    """The dtypes of the weights the decoder's linear layers compute with, over a few steps of 2
    micro-batches (seen from inside their forwards)."""
    seen: set[torch.dtype] = set()
    linears = [m for m in engine.unwrapped.model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(mod.weight.dtype)) for m in linears]
    try:
        for _ in range(steps):
            for i in range(2):
                with engine.accumulate(is_last=i == 1):
                    engine.backward(engine.forward(*batch()) * (engine.loss_scale / 32))
            assert engine.step(1.0).applied
    finally:
        for h in hooks:
            h.remove()
    return seen


def optimizer_dtypes(engine) -> set[torch.dtype]:
    return {p.dtype for g in engine.optimizer.param_groups for p in g["params"]}


def test_local_params_mode_computes_in_bf16_and_steps_fp32_masters():
    from tokentrain.distributed.env import DistEnv
    from tokentrain.engines.local import LocalEngine

    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    engines = {}
    for mode in ("params", "autocast"):
        module = module_bf16()
        engine = LocalEngine(env, torch.bfloat16, mode)
        engine.prepare(module, adamw(module))
        engines[mode] = engine
    params, autocast = engines["params"], engines["autocast"]
    assert compute_dtypes(params) == {torch.bfloat16}
    assert compute_dtypes(autocast) == {torch.float32}  # cast per op inside autocast, held fp32
    assert optimizer_dtypes(params) == optimizer_dtypes(autocast) == {torch.float32}
    assert {p.dtype for p in params.unwrapped.parameters()} == {torch.bfloat16}
    masters = params.masters
    assert masters is not None
    for p, m in zip(masters.params, masters.masters, strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))  # the compute parameters are the rounded masters
    with params.full_parameters():  # the export's view: the fp32 masters themselves
        state = params.unwrapped.model.state_dict()
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


@pytest.fixture
def group():
    import torch.distributed as dist

    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["params", "autocast"])
def test_fsdp2_gathers_bf16_parameters_in_params_mode_and_fp32_under_autocast(group, mode):
    from torch.distributed.tensor import DTensor

    from tokentrain.distributed.env import DistEnv
    from tokentrain.engines.fsdp2 import FSDP2Engine

    engine = FSDP2Engine(DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"), torch.bfloat16, False, mode)
    module = module_bf16()
    engine.prepare(module, adamw(module))
    want = torch.bfloat16 if mode == "params" else torch.float32
    assert compute_dtypes(engine) == {want}
    shards = list(engine.unwrapped.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in shards)  # the masters
    assert optimizer_dtypes(engine) == {torch.float32}


def test_auto_is_each_engines_native_form_and_params_with_fp16_needs_deepspeed():
    from tokentrain.engines.mixed_precision import resolve_mode
    from tokentrain.errors import ConfigError

    bf16 = torch.bfloat16
    assert {e: resolve_mode("auto", e, bf16) for e in ("local", "ddp", "fsdp2", "deepspeed")} == {
        "local": "autocast",
        "ddp": "autocast",
        "fsdp2": "params",
        "deepspeed": "params",
    }
    assert resolve_mode("params", "ddp", None) == "fp32"  # nothing to mix
    assert resolve_mode("params", "deepspeed", torch.float16) == "params"  # DeepSpeed scales the loss
    with pytest.raises(ConfigError, match="needs loss scaling"):
        resolve_mode("params", "local", torch.float16)


def test_deepspeed_bf16_reduces_gradients_in_fp32_and_autocast_turns_its_precision_off():
    from tokentrain.engines.deepspeed_config import fill_auto, load_deepspeed_config

    ds = load_deepspeed_config("deepspeed_zero2")
    kw = dict(micro_batch_size=1, accumulation=1, world_size=2, max_norm=1.0)
    bf16 = fill_auto(ds, dtype="bfloat16", **kw)
    assert bf16["bf16"]["enabled"] and bf16["communication_data_type"] == "fp32"
    fp32 = fill_auto(ds, dtype="float32", **kw)  # what mixed_precision = 'autocast' hands it
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"] and "communication_data_type" not in fp32


def test_an_unknown_mode_is_one_config_error_naming_the_key(tiny_model, tiny_data):
    from tests.helpers import make_config
    from tokentrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mixed_precision = 'bf16': must be one of auto, autocast, params"):
        make_config(tiny_model, tiny_data, mixed_precision="bf16")
