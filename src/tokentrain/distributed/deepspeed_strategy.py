"""DeepSpeed ZeRO behind the trainer's strategy seam (prepare/forward/backward/step/save/load).

The loss rule is the trainer's: every rank back-propagates ``world_size * loss_sum /
global_count``. DeepSpeed would also divide by the accumulation steps (``scale_wrt_gas``)
-- we switch that off -- and averages gradients over data-parallel ranks, which the
``world_size`` factor undoes, exactly as for DDP. Measured: 2 ranks x ZeRO-1/2/3 and
offload reach the same parameters as one process on the same global batches.

DeepSpeed counts micro-steps itself and only applies the optimizer on the accumulation
boundary, so ``backward`` advances its counter on every micro-batch but the last, and
``step`` closes the window. A step whose global batch has no target is skipped on every
rank alike (the count is global), so the counter stays aligned.

Checkpoints: DeepSpeed's own files in ``step_N/ds/`` written by every rank (engine,
optimizer partitions); the trainer's state beside them, as for the other strategies.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tokentrain.engine.strategy import LocalStrategy

log = logging.getLogger(__name__)

DS_TAG = "ds"


def _quiet_deepspeed() -> None:
    """On CPU, DeepSpeed's first init JIT-compiles a shared-memory comm op (~1 min) that
    gloo training does not need; and its INFO logs drown ours."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def _join_process_group(env) -> None:
    """DeepSpeed needs a process group even in one process (single-GPU ZeRO / offload), and its
    own comm layer set up *before* the model is built: ZeRO-3's zero.Init (transformers'
    from_pretrained / from_config) otherwise reads world size 1 and rejects the batch sizes."""
    from deepspeed import comm as ds_comm

    from tokentrain.distributed.env import ensure_process_group

    ensure_process_group(env)
    ds_comm.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False)


class DeepSpeedStrategy(LocalStrategy):
    name = "deepspeed"

    def __init__(self, env, ds_config: dict):
        super().__init__(env)
        _quiet_deepspeed()
        _join_process_group(env)
        self.ds_config = ds_config
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self._hf_ds_config = None
        self.inner = None
        if self.stage == 3:
            # Keeps transformers' ZeRO-3 hooks live: from_pretrained then builds the model
            # already partitioned (zero.Init) instead of whole on every rank.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)

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

    def accumulate(self, is_last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step count

    def step(self, max_norm: float) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return 0.0
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    @contextlib.contextmanager
    def full_parameters(self, module=None):
        """Whole parameters of `module` (default: the prepared one) on every rank for the
        duration: ZeRO-3 gathers them (all ranks must enter); other stages hold them whole."""
        module = module if module is not None else self.inner
        if self.stage != 3 or module is None:
            yield
            return
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield

    # ------------------------------------------------------------------ state
    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if path is None:
            from tokentrain.errors import ConfigError

            raise ConfigError(
                f"{folder}: no DeepSpeed checkpoint in it ({DS_TAG}/); was it written without --deepspeed?"
            )
