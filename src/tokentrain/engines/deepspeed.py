"""DeepSpeed ZeRO (stages 1, 2, 3, CPU offload) behind the engine seam.

The loss rule is the trainer's: every rank back-propagates ``world_size * loss_sum /
global_count``. DeepSpeed would also divide by the accumulation steps (``scale_wrt_gas``)
-- we switch that off -- and averages gradients over data-parallel ranks, which the
``world_size`` factor undoes, exactly as for DDP.

DeepSpeed counts micro-steps itself and only applies the optimizer on the accumulation
boundary, so ``backward`` advances its counter on every micro-batch but the last, and
``step`` closes the window. DeepSpeed skips the update when the gradient norm is not
finite (its overflow check); `step` reports that (`was_step_applied`).

DeepSpeed wants a process group even in one process, and its comm layer set up before the
model is built (ZeRO-3's ``zero.Init`` reads the world size from it): both happen when the
engine is made, which is before the model.

Mixed precision (`mixed_precision`, engines/mixed_precision.py): 'params' (the default) is
DeepSpeed's own bf16/fp16 mode -- it casts the module's parameters (not its buffers) to the
compute dtype and its ZeRO optimizer keeps fp32 partitions of them as the master weights, with
the Adam state; gradients are reduced in fp32 (``communication_data_type``, which DeepSpeed
otherwise sets to the compute dtype); the final export reads the fp32 masters. fp16 adds
DeepSpeed's dynamic loss scaling. 'autocast': DeepSpeed's precision sections off (fp32
parameters), the forward under our autocast.

Checkpoint format "deepspeed": DeepSpeed's own files in ``step_N/ds/`` written by every
rank (module states, optimizer partitions). At the world size they were written with they
are read back as they are; at another one, the main rank first converts them to DeepSpeed's
*universal checkpoint* (`deepspeed.checkpoint.ds_to_universal`: fp32 weights and Adam state
per parameter, whole) in a folder beside the checkpoint, every rank loads its new partition
from it (``load_universal``), and the folder is removed. `read_model_state` consolidates
them to fp32 on the CPU with DeepSpeed's reader (no process group) for `convert`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tokentrain.engines.base import Collectives, StepResult
from tokentrain.engines.deepspeed_config import zero_stage
from tokentrain.engines.local import LocalEngine
from tokentrain.errors import first_line

log = logging.getLogger(__name__)

DS_TAG = "ds"
PREFIX = "model."  # the trainer's CausalLMWithLoss holds the HF model as `.model`
# The non-tensor globals DeepSpeed pickles into its files (found in ZeRO-1/2/3 and offload
# checkpoints); by "module.name", imported only when a checkpoint is checked.
SAFE_GLOBAL_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def set_accelerator() -> None:
    """The one place that picks DeepSpeed's accelerator: before anything imports DeepSpeed
    (transformers does), else it probes for one and warns about a missing GPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def safe_globals() -> list:
    import importlib

    out = []
    for name in SAFE_GLOBAL_NAMES:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def owns_checkpoint(folder: Path) -> bool:
    return (Path(folder) / DS_TAG).is_dir()


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The HF model's fp32 state dict from any ZeRO stage's files, on the CPU."""
    _quiet_deepspeed()
    _allow_own_globals()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def to_universal(ds: Path, out: Path) -> None:
    """DeepSpeed's own converter (`ds_to_universal`), in this process, quiet: `ds` (one tag's
    files) -> `out`, replacing it. Its `torch.load` calls run weights-only (checkpoint/safety.py)."""
    import io
    from argparse import Namespace

    _quiet_deepspeed()
    _allow_own_globals()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    args = Namespace(
        input_folder=str(ds),
        output_folder=str(out),
        num_extract_workers=1,  # in this process: no pool of workers to start
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our checkpoints do not carry the universal-checkpoint info
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal(args)


def _quiet_deepspeed() -> None:
    """On CPU, DeepSpeed's first init JIT-compiles a shared-memory comm op (~1 min) that
    gloo training does not need; and its INFO logs drown ours."""
    set_accelerator()
    import deepspeed.ops
    from deepspeed.utils import logger as ds_logger

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_logger.setLevel(logging.WARNING)


def _allow_own_globals() -> None:
    """DeepSpeed loads its files with ``weights_only=False``, forced to weights-only process-wide
    (checkpoint/safety.py): the classes it pickles must be allowed, nothing else."""
    from tokentrain.checkpoint.safety import allow

    allow(safe_globals())


def _join_process_group(env) -> None:
    """A process group even in one process (single-GPU ZeRO / offload), and DeepSpeed's comm
    layer on top of it *before* the model is built: ZeRO-3's zero.Init (transformers'
    from_pretrained / from_config) otherwise reads world size 1 and rejects the batch sizes."""
    from deepspeed import comm as ds_comm

    from tokentrain.distributed.env import ensure_process_group

    ensure_process_group(env)
    ds_comm.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False)


class DeepSpeedEngine(Collectives, LocalEngine):
    name = "deepspeed"

    def __init__(self, env, ds_config: dict, compute_dtype: torch.dtype | None = None, mixed_precision: str = "params"):
        super().__init__(env, compute_dtype, mixed_precision)
        _quiet_deepspeed()
        _allow_own_globals()
        _join_process_group(env)
        self.ds_config = ds_config
        self.stage = zero_stage(ds_config)
        self.inner: Any = None  # the trainer's loss module, once prepared
        self._hf_ds_config = None
        if self.stage == 3:
            # Keeps transformers' ZeRO-3 hooks live: from_pretrained / from_config then build
            # the model already partitioned (zero.Init) instead of whole on every rank.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)

    @classmethod
    def create(cls, cfg, env, deepspeed: dict | None, compute_dtype: torch.dtype | None):
        from tokentrain.engines.deepspeed_config import resolve_for_run
        from tokentrain.engines.mixed_precision import resolve_mode

        assert deepspeed is not None, "choose() picks 'deepspeed' only with a DeepSpeed config"
        mode = resolve_mode(cfg.mixed_precision, cls.name, compute_dtype)
        params_dtype = compute_dtype if mode == "params" else None  # what DeepSpeed holds the module in
        return cls(env, resolve_for_run(deepspeed, cfg, env, params_dtype), compute_dtype, mode)

    @property
    def description(self) -> str:
        from tokentrain.engines.mixed_precision import describe

        offload = "offload_optimizer" in self.ds_config.get("zero_optimization", {})
        precision = describe(self.mixed_precision, self.compute_dtype)
        return f"DeepSpeed ZeRO stage {self.stage}" + (" with CPU offload" if offload else "") + f", {precision}"

    def close(self) -> None:
        """Forget the ZeRO-3 hooks, so a later model in this process is built whole again."""
        if self._hf_ds_config is not None:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds_config = None

    def prepare(self, module, optimizer):
        import deepspeed

        self.inner, self.optimizer = module, optimizer
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.module = self.engine
        return self.engine

    @property
    def unwrapped(self):
        return self.inner

    @property
    def loss_scale(self) -> float:
        return float(self.env.world_size)

    @property
    def partitioned_params(self) -> bool:
        """ZeRO-3: every forward needs every rank (parameters are gathered on the fly)."""
        return self.stage == 3

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step count

    def step(self, max_norm: float) -> StepResult:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = 0.0 if norm is None else float(norm.item() if torch.is_tensor(norm) else norm)
        applied = bool(self.engine.was_step_applied())
        return StepResult(norm, applied, loss_scale_overflow=not applied and self.engine.fp16_enabled())

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @contextlib.contextmanager
    def full_parameters(self, module=None):
        """Whole parameters of `module` (default: the prepared one) on every rank for the
        duration: ZeRO-3 gathers them (all ranks must enter); other stages hold them whole.
        No module (the final export) with bf16/fp16 parameters: the HF model's `state_dict()`
        returns the fp32 masters instead (`_fp32_masters`)."""
        export = module is None and self.mixed_precision == "params" and self.inner is not None
        module = module if module is not None else self.inner
        if self.stage != 3 or module is None:
            with self._fp32_masters() if export else contextlib.nullcontext():
                yield
            return
        from deepspeed.runtime.zero import GatheredParameters

        with (
            GatheredParameters(list(module.parameters()), modifier_rank=None),
            self._fp32_masters() if export else contextlib.nullcontext(),
        ):
            yield

    @contextlib.contextmanager
    def _fp32_masters(self):
        """DeepSpeed's fp32 master of every parameter of the HF model, assembled from the
        optimizer's partitions (`safe_get_full_fp32_param`, a collective: every rank takes part,
        one parameter at a time, on the CPU of the main rank) in place of its state dict."""
        from deepspeed.utils import safe_get_full_fp32_param

        hf = self.inner.model
        masters = {}
        for p in hf.parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None and self.env.is_main:
                masters[id(p)] = full.detach().cpu()
        state = {k: masters.get(id(v), v.detach()) for k, v in hf.state_dict(keep_vars=True).items()}
        hf.state_dict = lambda *a, **k: state  # instance attribute: shadows nn.Module.state_dict
        try:
            yield
        finally:
            del hf.state_dict

    # ------------------------------------------------------------------ state
    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        from tokentrain.engines.registry import checkpoint_record

        written = checkpoint_record(folder).get("world_size") or self.env.world_size
        why = []
        if written != self.env.world_size:
            why.append(f"was written by {written} rank(s)")
        if self._other_optimizer(folder):
            why.append("holds the other mixed_precision mode's optimizer (DeepSpeed's bf16 one or its fp32 one)")
        if not why:
            self._load(folder)
            return
        with self._universal(folder, written, " and ".join(why)) as universal:
            self.engine._config.load_universal_checkpoint = True  # what load_checkpoint reads
            try:
                self._load(universal)
            finally:
                self.engine._config.load_universal_checkpoint = False

    def _other_optimizer(self, folder: Path) -> bool:
        """True when the checkpoint's optimizer files are not the ones this engine reads: DeepSpeed
        names its bf16 optimizer's state ``bf16_zero_pp_rank_*`` (mixed_precision 'params' in bf16)
        and its fp32 one ``zero_pp_rank_*`` ('autocast'); the universal checkpoint is either's."""
        files = [p.name for p in (folder / DS_TAG).glob("*zero_pp_rank_*_optim_states.pt")]
        return bool(files) and any(f.startswith("bf16_") for f in files) != self.engine.bfloat16_enabled()

    @contextlib.contextmanager
    def _universal(self, folder: Path, written: int, why: str):
        """The checkpoint as DeepSpeed's universal checkpoint, in ``.step_N.universal`` beside
        it for the duration (shared by every rank, as checkpoints are): made by the main rank,
        a failure there stops every rank with its one line."""
        from tokentrain.errors import CheckpointError

        out = folder.parent / f".{folder.name}.universal"
        error = None
        if self.env.is_main:
            start = time.perf_counter()
            try:
                to_universal(folder / DS_TAG, out / DS_TAG)
            except Exception as e:
                error = (
                    f"{folder / DS_TAG} {why}, and cannot be converted to a universal checkpoint to resume on "
                    f"{self.env.world_size} rank(s) ({type(e).__name__}: {first_line(e)}); resume it as it was "
                    f"written ({written} rank(s), the same mixed_precision)"
                )
            else:
                log.info(
                    "%s %s: converted to DeepSpeed's universal checkpoint in %s (%.1fs) to resume on %d rank(s), "
                    "optimizer state included",
                    folder,
                    why,
                    out,
                    time.perf_counter() - start,
                    self.env.world_size,
                )
        error = self.broadcast_object(error)
        try:
            if error:
                raise CheckpointError(error)
            yield out
        finally:
            self.barrier()
            if self.env.is_main:
                shutil.rmtree(out, ignore_errors=True)

    def _load(self, folder: Path) -> None:
        import pickle

        from tokentrain.errors import CheckpointError, TokentrainError

        try:
            path, _ = self.engine.load_checkpoint(
                str(folder),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=True,
            )
        except (TokentrainError, pickle.UnpicklingError):  # (a refused pickle: checkpoint/safety says so)
            raise
        except Exception as e:  # state files that are not DeepSpeed's (KeyError: 'module'), or of another model
            raise CheckpointError(
                f"{folder / DS_TAG}: not a DeepSpeed checkpoint this run can load ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); use another checkpoint or start a new --work-dir"
            ) from None
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint in {DS_TAG}/")
