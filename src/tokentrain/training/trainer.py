"""The training loop. Read `Trainer.fit` top to bottom: that is what one run does.

One optimizer step (`train_step`):

1. take the step's micro-batches (batch_size x accumulative_counts samples per rank);
2. count their target tokens and sum the count over all ranks -- *before* any backward;
3. for each micro-batch: forward -> fp32 sum of CE over its targets -> backward of
   ``loss_sum * loss_scale / global_count`` (the engine reduces gradients on the last one);
4. the engine clips and applies the update (never with a non-finite gradient norm); lr step.

So every target token of the global batch weighs the same, and the parameters after a
step do not depend on how the global batch is split across micro-batches, accumulation
and ranks. A step whose global batch has no target token does no forward, no backward
and no optimizer update (loss 0, counted as skipped).

Host syncs: a micro-batch reads nothing back from the device (what the step needs about its
batch is counted on the host by `collate`: data/batch.py). A step reads a fixed number of
values, whatever `accumulative_counts`: the gradient norm (the engine must know it is finite
before it applies the update, so NaN never reaches the weights or the Adam moments) and, in one
all-reduce, the step's loss sum with the preemption flag and token counts (every rank stops at
the same step; `nan_policy` names the step and its samples). The loss could be read once per
log interval instead; that would lose the exact step of a non-finite loss and save one read
per optimizer step, not per micro-batch. tests/training/test_host_syncs.py counts them.

When to checkpoint, evaluate and log is decided by their owners (`CheckpointManager.due`,
`Evaluator.due`, `MetricsLogger.due`); the loop only asks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokentrain.checkpoint.fingerprint import run_fingerprint
from tokentrain.checkpoint.hf_export import export_hf
from tokentrain.checkpoint.manager import CheckpointManager
from tokentrain.checkpoint.rng import set_rng_state
from tokentrain.config.schema import TrainConfig
from tokentrain.data.checks import check_datasets, check_stored_ids
from tokentrain.errors import EXIT_OK, EXIT_PREEMPTED, ConfigError, TokentrainError
from tokentrain.metrics.flops import FlopCounter, full_numel, peak_tflops
from tokentrain.metrics.logger import MetricsLogger
from tokentrain.metrics.sources import SourceTokens
from tokentrain.metrics.window import Window, memory_gb
from tokentrain.training.batch_checks import check_token_ids, describe_samples
from tokentrain.training.checkpointing import enable_checkpointing
from tokentrain.training.data_stream import MicroBatch, StepStream
from tokentrain.training.evaluation import Evaluator
from tokentrain.training.preemption import Preemption
from tokentrain.training.schedule import WarmupCosine, planned_steps
from tokentrain.training.step import StepOutcome, StepTotals, seed_everything
from tokentrain.utils import faults

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tokentrain.engines.base import Engine

log = logging.getLogger("tokentrain.train")


class TrainingDiverged(TokentrainError):
    """The loss or the gradients became NaN/inf (with nan_policy = 'stop')."""


def fused_adamw(params: Sequence[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one launch for every parameter) when this torch has it and every
    parameter is a floating CUDA tensor; else its foreach path (CPU, FSDP2's offloaded shards)."""
    import inspect

    return (
        bool(params)
        and "fused" in inspect.signature(torch.optim.AdamW).parameters
        and all(p.is_cuda and p.is_floating_point() for p in params)
    )


class Trainer:
    def __init__(self, cfg: TrainConfig, env, work_dir: Path, resume: str | None = None, deepspeed: dict | None = None):
        self.cfg, self.env, self.work_dir = cfg, env, Path(work_dir)
        self.resume = resume
        self.deepspeed = deepspeed  # a DeepSpeed config (preset or user JSON), "auto" values unresolved
        self.step = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.preemption = Preemption()
        self.started: Callable[[], None] | None = None  # called once, after the first checkpoint

    # ================================================================== setup
    def setup(self) -> None:
        self.preemption.install()
        try:
            self._setup()
        except BaseException:
            self.preemption.restore()
            raise

    def _setup(self) -> None:
        from tokentrain.model.lm import load_tokenizer, read_config, vocab_size

        cfg, env = self.cfg, self.env
        seed_everything(cfg.seed, env.rank)
        self._setup_data()
        # The tokenizer first (a path that cannot load fails there, once: no second round of hub
        # retries for its config), then the model's config.json: what the checks before the
        # weights need (positions, the resume's fingerprint).
        self.tokenizer = load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
        self.model_config = read_config(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
        self._check_ids_early()
        self.engine = self._make_engine()  # before the model: ZeRO-3 / FSDP2 build it sharded
        self.ckpt = CheckpointManager(
            self.work_dir / "checkpoints",
            env,
            self.engine,
            cfg.save_total_limit,
            every=cfg.save_steps,
            fingerprint=run_fingerprint(cfg, self.model_config, vocab_size(self.model_config), env.world_size),
            ignore=cfg.resume_ignore,
        )
        self.ckpt.check(self.resume)  # before the model: a refused resume costs no model load
        self._setup_model()
        check_datasets(
            self.train_set, self.val_set, self.vocab_size, cfg.dataset_folder, cfg.val_dataset_folder, cfg.datasets
        )
        self._setup_optimization()
        # What a checkpoint holds, listed once: saved and restored through state_dict/load_state_dict.
        self.ckpt.states = {
            "trainer": self,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "source_tokens": self.source_tokens,
        }
        self.flops = FlopCounter.for_model(self.hf_model)
        self.peak = peak_tflops(env.device, self.compute_dtype, cfg.peak_tflops)
        rng = self._resume()
        # (the JSONL sink drops the records after a resumed step itself)
        self.metrics = MetricsLogger(
            self.work_dir,
            env.is_main,
            self.total_steps,
            self.step,
            cfg.tensorboard,
            cfg.wandb,
            cfg.to_dict(),
            interval=cfg.log_interval,
        )
        self.evaluator = Evaluator(
            cfg,
            env,
            self.engine,
            self.val_set,
            self.hf_model,
            self.tokenizer,
            self.compute_dtype,
            self.work_dir,
            self.metrics,
        )
        if rng is not None:
            set_rng_state(rng)  # last: nothing may draw from the RNG between here and the loop

    def _make_engine(self) -> Engine:
        from tokentrain.engines.registry import build_engine, choose
        from tokentrain.model.lm import autocast_dtype

        self.compute_dtype = autocast_dtype(self.cfg.dtype, self.env.device)  # resolved once, handed on
        name = choose(self.cfg.engine, deepspeed=self.deepspeed is not None, world_size=self.env.world_size)
        engine = build_engine(name, self.cfg, self.env, self.deepspeed, self.compute_dtype)
        if self.env.is_main:
            log.info("engine: %s", engine.description)
        return engine

    def _setup_data(self) -> None:
        from tokentrain.data.dataset import build_named, build_train_data, settings_for

        cfg, env = self.cfg, self.env
        # One dataset_folder, or a `datasets` mixture (data/mixture.py): the dataset and its sampler.
        self.train_set, self.sampler = build_train_data(cfg, env.rank, env.world_size)
        self.source_tokens = SourceTokens(getattr(self.train_set, "names", None))
        val = cfg.val_dataset_folder
        self.val_set = build_named(settings_for(cfg, val), "val_dataset_folder") if val else None
        self.stream = StepStream(
            self.train_set,
            self.sampler,
            cfg.batch_size,
            cfg.accumulative_counts,
            cfg.dataloader_num_workers,
            pin_memory=env.device.type == "cuda",
        )
        spe = self.stream.steps_per_epoch
        self.total_steps = planned_steps(cfg.max_iters, cfg.max_epochs, spe)  # what `tokentrain plan` says too
        if env.is_main:
            log.info(
                "data: %d samples of max_length %d, %d steps per epoch of %d samples (%d per rank x %d "
                "ranks), %d steps in all",
                len(self.train_set),
                cfg.max_length,
                spe,
                self.stream.samples_per_step * env.world_size,
                self.stream.samples_per_step,
                env.world_size,
                self.total_steps,
            )
        if env.is_main and self.source_tokens.names:
            from tokentrain.data.dataset import log_mixture_plan, planned_counts

            g = self.stream.samples_per_step * env.world_size
            log_mixture_plan(self.train_set, planned_counts(self.train_set, self.total_steps, spe, g))

    def _check_ids_early(self) -> None:
        """Ids over the model's vocabulary refused from the files' stored summaries, before the
        engine and the model are built (else found only when their batch comes up)."""
        from tokentrain.data.corpus_check import vocab_size_of

        cfg = self.cfg
        try:
            vocab = vocab_size_of(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
        except ConfigError:
            return  # load_model says why the model cannot be read
        sets = [self.train_set] + ([self.val_set] if self.val_set is not None else [])
        checked, missing = check_stored_ids(sets, vocab, cfg.pretrained_model_name_or_path)
        if not self.env.is_main:
            return
        if missing:
            log.info(
                "token ids: %d of %d data file(s) not yet summarised, so checked batch by batch as read; "
                "`tokentrain data check --config CFG` checks them all up front (and records them for this check)",
                missing,
                checked + missing,
            )
        else:
            log.info("token ids: every data file's largest id is < the vocabulary size %d", vocab)

    def _setup_model(self) -> None:
        from tokentrain.model.attention import auto_attention, choose_attn_implementation, select_masking
        from tokentrain.model.kernels import choose_kernels
        from tokentrain.model.lm import (
            CausalLMWithLoss,
            check_positions,
            load_model,
            soft_caps_attention,
        )

        cfg, env = self.cfg, self.env
        capped = env.device.type == "cuda" and soft_caps_attention(
            cfg.pretrained_model_name_or_path, cfg.trust_remote_code
        )
        impl = choose_attn_implementation(cfg.attn_implementation, env.device, cfg.use_varlen_attn, capped)
        too_long = check_positions(cfg.pretrained_model_name_or_path, cfg.trust_remote_code, cfg.max_length)
        if too_long and env.is_main:
            log.warning("%s", too_long)
        fallback = "eager" if cfg.attn_implementation == "auto" else None  # a model without `impl` (gemma2: sdpa)
        model_type = getattr(self.model_config, "model_type", "")
        kernels = choose_kernels(cfg.kernels, env.device, model_type)
        if env.is_main:
            log.info("kernels: %s (%s)", kernels.name, kernels.why)
        self.hf_model: PreTrainedModel = load_model(  # one builder; FSDP2 shards as it builds
            cfg.pretrained_model_name_or_path,
            cfg.trust_remote_code,
            impl,
            env.device,
            cfg.seed,
            fallback,
            shard=self.engine.shard_hook,
            kernels=kernels,
        )
        impl = self.hf_model.config._attn_implementation
        emb = self.hf_model.get_input_embeddings()
        self.vocab_size = int(getattr(emb, "num_embeddings", 0) or self.hf_model.config.vocab_size)
        with self.engine.full_parameters(self.hf_model):  # the probes run the model (ZeRO-3: gathered for them)
            masking = select_masking(
                self.hf_model, impl, cfg.doc_masking, env.device, self.compute_dtype, fallback=auto_attention(cfg)
            )
            self._compile(masking)  # before the loss module: its fused-head check runs compiled too
            self.module = CausalLMWithLoss(
                self.hf_model, masking, self.compute_dtype, cfg.loss_chunk_tokens, kernels.liger
            )
        impl = masking.attn_implementation
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.hf_model, cfg.gradient_checkpointing)
        self.hf_model.train()
        if env.is_main:
            n = sum(full_numel(p) for p in self.hf_model.parameters())
            log.info(
                "model: %s, %.2fM parameters, %s attention, documents kept apart by %s, compute %s, loss %s",
                type(self.hf_model).__name__,
                n / 1e6,
                impl,
                masking.mode,
                str(self.compute_dtype or torch.float32).replace("torch.", ""),
                ("fused (Liger)" if kernels.liger else "fused chunked") if self.module.fused else "chunked from logits",
            )

    def _compile(self, masking) -> None:
        """Compile the decoder layers (`compile`, training/compile.py) and run the start-up
        probes again on the compiled model: eager chose the attention path and stays the
        reference. 'auto' goes back to eager in one line when the compiled model fails them."""
        from tokentrain.model.attention import probe_failure
        from tokentrain.training.compile import compile_layers, uncompile_layers, wanted

        self.compiled: list = []
        self.compile_s = 0.0
        if not wanted(self.cfg.compile, self.env.device):
            return
        t0 = time.perf_counter()
        layers = compile_layers(self.hf_model)
        why = probe_failure(self.hf_model, masking, self.env.device, self.compute_dtype) if layers else "no layers"
        if why is None:
            self.compiled, self.compile_s = layers, time.perf_counter() - t0
            return
        uncompile_layers(layers)
        if self.cfg.compile is True:
            raise ConfigError(
                f"compile = True: the compiled decoder layers fail the start-up probes ({why}); "
                "set compile = 'auto' or False"
            )
        if self.env.is_main:
            log.warning("compile: the compiled decoder layers fail the start-up probes (%s); training eager", why)

    def _setup_optimization(self) -> None:
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        fused = fused_adamw(params)
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            weight_decay=cfg.weight_decay,
            **({"fused": True} if fused else {"foreach": True}),
        )
        self.model = self.engine.prepare(self.module, optimizer)
        self.optimizer = optimizer = self.engine.optimizer  # an engine may rebuild it over its shards
        self.scheduler = WarmupCosine(optimizer, self.total_steps, cfg.warm_up_ratio, cfg.min_lr_ratio)

    # ================================================================== checkpoint state
    def state_dict(self) -> dict:
        """The trainer's own part of a checkpoint: its counters (CheckpointManager.states)."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
            "tokens_seen": self.tokens_seen,
            "world_size": self.env.world_size,
            "engine": self.engine.name,
        }

    def _resume(self) -> dict | None:
        """Restore the checkpoint `--resume` names, if any; this rank's RNG state to apply last."""
        restored = self.ckpt.restore(self.resume)
        if restored is None:
            return None
        folder, rng = restored
        if self.env.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d, %d samples into it on each rank)",
                folder,
                self.step,
                self.sampler.epoch,
                self.sampler.consumed,
            )
        return rng

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.tokens_seen = int(state["tokens_seen"])
        if state["total_steps"] != self.total_steps:
            log.warning(
                "the checkpoint was taken in a run of %d steps, this one has %d: the lr schedule changes",
                state["total_steps"],
                self.total_steps,
            )

    def save(self) -> None:
        path = self.ckpt.save(self.step, self.cfg.to_dict())
        self.metrics.message(f"checkpoint {path}")
        if self.started is not None:  # the new run is proven: --overwrite may now delete the old one
            started, self.started = self.started, None
            started()

    # ================================================================== the loop
    def fit(self) -> int:
        self.preemption.install()
        self.t_start = time.perf_counter()
        steps = None
        try:
            if self.step == 0:
                self.evaluator.run(self.step, val=False)
            steps = iter(self.stream)
            window, saved_at = Window(), self.step
            first = True
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                micro = next(steps)
                t_data = time.perf_counter() - t0

                outcome = self.train_step(micro)
                if first and self.compiled and self.env.is_main:
                    log.info(
                        "compile: %d decoder blocks compiled in %.1f s (start-up probes) + %.1f s (first step, "
                        "compiling for the training shapes)",
                        len(self.compiled),
                        self.compile_s,
                        time.perf_counter() - t0,
                    )
                first = False
                self.scheduler.step()
                self.sampler.advance(self.stream.samples_per_step)
                self.step += 1
                totals = self._sum_over_ranks(outcome, micro)
                self._account(outcome, totals, micro)
                window.add(
                    time.perf_counter() - t0,
                    t_data,
                    totals.real_tokens,
                    int(outcome.global_targets),
                    self.flops.step_flops(totals.real_tokens, totals.sq_doc_lengths),
                    totals.loss_sum,
                )
                self.metrics.advance(1, totals.loss)

                last = self.step == self.total_steps
                evaluating = self.evaluator.due(self.step, last=last)
                if self.ckpt.due(self.step, last=last, stop=totals.stop):  # saved before evaluating: an
                    self.save()  # evaluation failure never loses the step's checkpoint
                    saved_at = self.step
                extra = self.evaluator.run(self.step) if evaluating else {}
                if self.metrics.due(self.step, last=last, forced=evaluating or totals.stop):
                    self.metrics.write(self._record(outcome, totals, window, extra))
                    window = Window()
                if totals.stop:
                    self.metrics.message(
                        f"stopped by {self.preemption.describe()} after step {self.step}; checkpoint written, "
                        "resume with --resume auto"
                    )
                    return EXIT_PREEMPTED
                if evaluating or self.step == saved_at:
                    window.reset_clock()
            if self.step > saved_at:
                self.save()
            self._export()
            return EXIT_OK
        finally:
            if steps is not None:
                steps.close()  # stops DataLoader workers now, also when training stops on an error
            self.preemption.restore()
            self.metrics.close()

    def _export(self) -> None:
        """The final Hugging Face folder, WORK_DIR/hf."""
        with self.engine.full_parameters():  # ZeRO-3 / FSDP: gathered on every rank; main writes
            if self.env.is_main:
                export_hf(self.hf_model, self.tokenizer, self.work_dir / "hf", self.cfg.export_dtype)
        if self.env.is_main:
            self.metrics.message(
                f"done: {self.step} steps ({self.skipped_steps} skipped); Hugging Face model in {self.work_dir / 'hf'}"
            )
        self.engine.barrier()

    def train_step(self, micro: list[MicroBatch]) -> StepOutcome:
        """One optimizer step on this rank's micro-batches."""
        engine, device = self.engine, self.env.device
        for m in micro:
            check_token_ids(m.batch, self.vocab_size, self.train_set)
        # Count the step's target tokens on all ranks before any backward.
        (global_targets,) = engine.all_reduce_sum([float(sum(m.batch.num_targets for m in micro))])
        lr = self.scheduler.lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        if global_targets == 0:  # nothing to learn from: no forward, no backward, no update
            engine.zero_grad()
            return StepOutcome(loss_sum, 0.0, lr, 0.0, applied=False)
        scale = engine.loss_scale / global_targets
        for i, m in enumerate(micro):
            batch = m.batch.to(device)
            with engine.accumulate(is_last=i == len(micro) - 1):
                part = engine.forward(
                    batch.input_ids, batch.labels, batch.position_ids, batch.doc_bounds, batch.targets, batch.max_doc
                )
                if faults.FAULTS and faults.at_step("nan_loss_at_step", self.step + 1, self.env.rank):
                    part = part * math.nan
                engine.backward(part * scale)
            loss_sum += part.detach()
        if faults.FAULTS and faults.at_step("inf_grad_at_step", self.step + 1, self.env.rank):
            grads = engine.gradients()
            if grads:  # (a ZeRO engine keeps its gradients in its own buffers)
                grads[0].fill_(math.inf)
        result = engine.step(self.cfg.max_norm)  # a non-finite gradient norm applies no update
        return StepOutcome(loss_sum, global_targets, lr, result.grad_norm, result.applied, result.loss_scale_overflow)

    def _sum_over_ranks(self, outcome: StepOutcome, micro: list[MicroBatch]) -> StepTotals:
        local_real = sum(m.real_tokens for m in micro)
        local_sq = sum(m.sq_doc_lengths for m in micro)
        total_loss, stop, real, sq, *per_source = self.engine.all_reduce_sum(
            [float(outcome.loss_sum), float(self.preemption.requested), float(local_real), float(local_sq)]
            + self.source_tokens.local(micro)
        )
        self.source_tokens.add(per_source)
        loss = total_loss / outcome.global_targets if outcome.global_targets else 0.0
        return StepTotals(loss, total_loss, int(real), int(sq), bool(stop))

    def _account(self, outcome: StepOutcome, totals: StepTotals, micro: list[MicroBatch]) -> None:
        """Count the step: tokens, and a skipped update (empty step, fp16 overflow, non-finite)."""
        self.tokens_seen += totals.real_tokens
        if outcome.empty:
            self.skipped_steps += 1
        elif outcome.loss_scale_overflow and math.isfinite(totals.loss):
            self.skipped_steps += 1
            self.metrics.message(f"step {self.step}: fp16 loss scale overflow; update skipped (the scale is lowered)")
        elif not (math.isfinite(totals.loss) and math.isfinite(outcome.grad_norm)):
            self._non_finite(totals.loss, outcome.grad_norm, micro)

    def _non_finite(self, loss: float, grad_norm: float, micro: list[MicroBatch]) -> None:
        """A NaN/inf loss or gradient norm (the same on every rank): stop, naming the step and
        this rank's samples, or (nan_policy = 'skip') count the step as skipped. No update was
        applied either way (every engine skips the optimizer step on a non-finite norm)."""
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.cfg.nan_policy == "skip":
            self.skipped_steps += 1
            self.metrics.message(
                f"step {self.step}: non-finite {what}; update skipped (nan_policy='skip', "
                f"{self.skipped_steps} skipped so far)"
            )
            return
        raise TrainingDiverged(
            f"non-finite {what} at step {self.step}; batch of rank {self.env.rank}: "
            f"{describe_samples(self.train_set, micro)}; no checkpoint was written for it "
            f"(last: {self.work_dir / 'checkpoints'}); lower lr, check those lines, or set nan_policy = 'skip'"
        )

    def _record(self, outcome: StepOutcome, totals: StepTotals, window: Window, extra: dict) -> dict:
        r = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.stream.epoch_progress(), 4),
            "loss": window.mean_loss,  # token-weighted over the steps since the last record
            "loss_last": totals.loss,
            "lr": outcome.lr,
            "grad_norm": outcome.grad_norm,
            "target_tokens": int(outcome.global_targets),
            "tokens": self.tokens_seen,
            **self.source_tokens.record(),
        }
        r.update(extra)
        r.update(window.summary(self.env.world_size, self.peak))
        r["memory_gb"] = memory_gb(self.env.device)
        r["elapsed"] = time.perf_counter() - self.t_start  # seconds since this process started training
        r["skipped_steps"] = self.skipped_steps
        return r


def run(
    cfg: TrainConfig,
    env,
    work_dir: Path,
    resume: str | None,
    deepspeed: dict | None = None,
    started: Callable[[], None] | None = None,
) -> int:
    """Set up and train; `started` is called once the first checkpoint is written (--overwrite then
    deletes the old run)."""
    trainer = Trainer(cfg, env, work_dir, resume, deepspeed)
    trainer.started = started
    trainer.setup()
    return trainer.fit()
