"""The training loop. Read `Trainer.fit` top to bottom: that is what one run does.

One optimizer step:

1. take the step's micro-batches (batch_size x accumulative_counts samples per rank);
2. count their target tokens and sum the count over all ranks -- *before* any backward;
3. for each micro-batch: forward -> fp32 sum of CE over its targets -> backward of
   ``loss_sum * loss_scale / global_count`` (DDP syncs gradients on the last one only);
4. clip, optimizer step, lr schedule step.

So every target token of the global batch weighs the same, and the parameters after a
step do not depend on how the global batch is split across micro-batches, accumulation
and ranks. A step whose global batch has no target token does no forward, no backward
and no optimizer update (loss 0, counted as skipped).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from tokentrain.checkpoint.fingerprint import check_resume, run_fingerprint  # [runs]
from tokentrain.checkpoint.hf_export import export_hf
from tokentrain.checkpoint.manager import CheckpointError, CheckpointManager, resolve_resume, set_rng_state, step_of
from tokentrain.config.schema import TrainConfig
from tokentrain.data.checks import build_named, check_datasets  # [runs]
from tokentrain.engine.data_stream import StepStream
from tokentrain.engine.evaluation import generate_samples, validation_loss
from tokentrain.engine.schedule import WarmupCosine
from tokentrain.engine.strategy import make_strategy
from tokentrain.errors import EXIT_OK, EXIT_PREEMPTED, DataError, TokentrainError
from tokentrain.metrics.flops import FlopCounter, peak_tflops
from tokentrain.metrics.logger import MetricsLogger
from tokentrain.run import signals as run_signals  # [runs]
from tokentrain.utils import faults

log = logging.getLogger("tokentrain.train")

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # [runs] SIGINT stops like SIGTERM


class TrainingDiverged(TokentrainError):
    """The loss or the gradients became NaN/inf (with nan_policy = 'stop')."""


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits 75."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def install(self) -> None:
        """Idempotent; installed from the start of setup, so a signal during model loading
        also ends in a checkpoint (after the first step) rather than a kill."""
        if self._old:
            return
        for s in PREEMPT_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:  # [runs] a second Ctrl-C: abort now (130)
            run_signals.abort_now(signum)
        run_signals.notice_stop(signum)  # [runs]
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant; the name changed in transformers 5.x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: TrainConfig, env, work_dir: Path, resume: str | None = None, deepspeed: dict | None = None):
        self.cfg, self.env, self.work_dir = cfg, env, Path(work_dir)
        self.resume = resume
        self.deepspeed = deepspeed  # a DeepSpeed config (preset or user JSON), "auto" values unresolved
        self.step = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.preemption = Preemption()

    # ================================================================== setup
    def setup(self) -> None:
        self.preemption.install()
        try:
            self._setup()
        except BaseException:
            self.preemption.restore()
            raise

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        seed_everything(cfg.seed, env.rank)
        self._setup_data()
        self.strategy = self._make_strategy()  # before the model: ZeRO-3 builds it partitioned
        self._setup_model()
        check_datasets(
            self.train_set, self.val_set, self.vocab_size, cfg.dataset_folder, cfg.val_dataset_folder
        )  # [runs]
        self._setup_optimization()
        self.ckpt = CheckpointManager(self.work_dir / "checkpoints", env, self.strategy, cfg.save_total_limit)
        self.flops = FlopCounter.for_model(self.hf_model)
        self.peak, self.peak_source = peak_tflops(env.device, self.compute_dtype, cfg.peak_tflops)
        resume_from = self._resolve_resume()
        self.ckpt.fingerprint = run_fingerprint(cfg, self.hf_model.config, self.vocab_size, env.world_size)  # [runs]
        check_resume(resume_from, self.ckpt.fingerprint, cfg.resume_ignore)  # [runs] refuse a changed run
        rng = self._load(resume_from) if resume_from is not None else None
        if env.is_main and resume_from is not None:
            _truncate_metrics(self.work_dir / "metrics.jsonl", self.step)
        self.metrics = MetricsLogger(self.work_dir, env.is_main, self.total_steps, self.step, cfg.tensorboard)
        if rng is not None:
            set_rng_state(rng)  # last: nothing may draw from the RNG between here and the loop

    def _resolve_resume(self) -> Path | None:
        """The checkpoint to resume from, chosen (and its files verified) by the main rank; every
        rank takes the same one."""
        root = self.work_dir / "checkpoints"
        if self.env.world_size == 1:
            return resolve_resume(self.resume, root)
        error, found = None, None
        if self.env.is_main:
            try:
                found = resolve_resume(self.resume, root)
            except TokentrainError as e:
                error = e
        code = -2.0 if error else (-1.0 if found is None else float(step_of(found)))
        (code,) = self.strategy.all_reduce_sum([code if self.env.is_main else 0.0])
        if error:
            raise error
        if code == -2:
            raise CheckpointError(f"--resume {self.resume}: refused by rank 0 (see its message)")
        if self.env.is_main or code == -1:
            return found
        mine = resolve_resume(self.resume, root, verify=False)  # the same folder, without reading it again
        return mine.parent / f"step_{int(code)}"

    def _setup_data(self) -> None:
        from tokentrain.data.dataset import DataSettings
        from tokentrain.data.sampler import ResumableSampler

        cfg, env = self.cfg, self.env

        def settings(folder):
            return DataSettings(
                folder=folder,
                max_length=cfg.max_length,
                pack_to_max_length=cfg.pack_to_max_length,
                shuffle=cfg.shuffle_before_pack,
                seed=cfg.seed,
                min_length=cfg.min_length,
                file_type=cfg.file_type,
                data_order_path=cfg.data_order_path,
                zero_is_target=cfg.zero_is_target,
            )

        self.train_set = build_named(settings(cfg.dataset_folder), "dataset_folder")  # [runs] names the set
        val = cfg.val_dataset_folder
        self.val_set = build_named(settings(val), "val_dataset_folder") if val else None  # [runs]
        self.sampler = ResumableSampler(len(self.train_set), env.rank, env.world_size, seed=cfg.seed, shuffle=True)
        self.stream = StepStream(
            self.train_set,
            self.sampler,
            cfg.batch_size,
            cfg.accumulative_counts,
            cfg.dataloader_num_workers,
            pin_memory=env.device.type == "cuda",
        )
        spe = self.stream.steps_per_epoch
        self.total_steps = cfg.max_iters if cfg.max_iters is not None else cfg.max_epochs * spe
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

    def _setup_model(self) -> None:
        from tokentrain.model.attention import choose_attn_implementation, select_masking
        from tokentrain.model.lm import CausalLMWithLoss, autocast_dtype, load_model, load_tokenizer

        cfg, env = self.cfg, self.env
        self.compute_dtype = autocast_dtype(cfg.dtype, env.device)
        impl = choose_attn_implementation(cfg.attn_implementation, env.device, cfg.use_varlen_attn)
        self.tokenizer = load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
        self.hf_model = load_model(cfg.pretrained_model_name_or_path, cfg.trust_remote_code, impl, env.device, cfg.seed)
        emb = self.hf_model.get_input_embeddings()
        self.vocab_size = int(getattr(emb, "num_embeddings", 0) or self.hf_model.config.vocab_size)
        with self.strategy.full_parameters(self.hf_model):  # the probes run the model (ZeRO-3: gathered for them)
            masking = select_masking(self.hf_model, impl, cfg.doc_masking, env.device, self.compute_dtype)
            self.module = CausalLMWithLoss(self.hf_model, masking, self.compute_dtype, cfg.loss_chunk_tokens)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.hf_model)
        self.hf_model.train()
        if env.is_main:
            n = sum(p.numel() for p in self.hf_model.parameters())
            log.info(
                "model: %s, %.2fM parameters, %s attention, documents kept apart by %s, compute %s, loss %s",
                type(self.hf_model).__name__,
                n / 1e6,
                impl,
                masking.mode,
                str(self.compute_dtype or torch.float32).replace("torch.", ""),
                "fused chunked" if self.module.fused else "chunked from logits",
            )

    def _make_strategy(self):
        from tokentrain.model.lm import autocast_dtype

        cfg, env = self.cfg, self.env
        if self.deepspeed is None:
            return make_strategy(env)
        from transformers import AutoConfig

        from tokentrain.distributed.deepspeed_config import fill_auto
        from tokentrain.distributed.deepspeed_strategy import DeepSpeedStrategy

        compute = autocast_dtype(cfg.dtype, env.device)
        hidden = getattr(
            AutoConfig.from_pretrained(cfg.pretrained_model_name_or_path, trust_remote_code=cfg.trust_remote_code),
            "hidden_size",
            None,
        )
        ds = fill_auto(
            self.deepspeed,
            micro_batch_size=cfg.batch_size,
            accumulation=cfg.accumulative_counts,
            world_size=env.world_size,
            max_norm=cfg.max_norm,
            dtype=str(compute or torch.float32).replace("torch.", ""),
            hidden_size=hidden,
        )
        if env.is_main:
            log.info(
                "engine: DeepSpeed ZeRO stage %d%s",
                ds.get("zero_optimization", {}).get("stage", 0),
                " with CPU offload" if "offload_optimizer" in ds.get("zero_optimization", {}) else "",
            )
        return DeepSpeedStrategy(env, ds)

    def _setup_optimization(self) -> None:
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        fused = self.env.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            **({"fused": True} if fused else {"foreach": True}),
        )
        self.model = self.strategy.prepare(self.module, optimizer)
        self.optimizer = optimizer
        self.scheduler = WarmupCosine(optimizer, self.total_steps, cfg.warm_up_ratio, cfg.min_lr_ratio)

    # ================================================================== checkpoint state
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "world_size": self.env.world_size,
        }

    def _load(self, folder: Path) -> dict | None:
        state, rng = self.ckpt.load(folder)
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.tokens_seen = int(state["tokens_seen"])
        if state["total_steps"] != self.total_steps:
            log.warning(
                "the checkpoint was taken in a run of %d steps, this one has %d: the lr schedule changes",
                state["total_steps"],
                self.total_steps,
            )
        if self.env.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d, %d samples into it on each rank)",
                folder,
                self.step,
                self.sampler.epoch,
                self.sampler.consumed,
            )
        return rng

    def save(self) -> None:
        path = self.ckpt.save(self.step, self.trainer_state(), self.cfg.to_dict())
        self.metrics.message(f"checkpoint {path}")

    # ================================================================== evaluation
    def evaluate(self, val: bool, generate: bool) -> dict:
        out = {}
        with torch.random.fork_rng(devices=[self.env.device] if self.env.device.type == "cuda" else []):
            if val and self.val_set is not None:
                out["val_loss"] = validation_loss(self.strategy, self.val_set, self.env, self.cfg.batch_size, 0)
            # ZeRO-3 gathers parameters in every forward: all ranks generate together then.
            everyone = self.strategy.partitioned_params
            if generate and self.cfg.evaluation_inputs and (self.env.is_main or everyone):
                try:
                    samples = generate_samples(
                        self.hf_model,
                        self.tokenizer,
                        self.cfg.evaluation_inputs,
                        self.cfg.SYSTEM,
                        self.cfg.evaluation_max_new_tokens,
                        self.env.device,
                        self.compute_dtype,
                        synced=everyone,
                    )
                except Exception as e:  # a sample to read is not worth a crashed run
                    self.metrics.message(f"generation at step {self.step} failed: {type(e).__name__}: {e}")
                    samples = []
                if not self.env.is_main:
                    samples = []
                with open(self.work_dir / "generations.jsonl", "a") as f:
                    for prompt, text in samples:
                        self.metrics.message(f"sample at step {self.step}: {prompt!r} -> {text!r}")
                        f.write(
                            json.dumps({"step": self.step, "input": prompt, "output": text}, ensure_ascii=False) + "\n"
                        )
        return out

    # ================================================================== the loop
    def fit(self) -> int:
        cfg, env, strategy = self.cfg, self.env, self.strategy
        self.preemption.install()
        self.t_start = time.perf_counter()
        try:
            if self.step == 0:
                self.evaluate(val=False, generate=True)
            steps = iter(self.stream)
            window = _Window()
            saved_at = self.step
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                micro = next(steps)
                t_data = time.perf_counter() - t0

                loss_sum, global_targets, lr, grad_norm = self.train_step(micro)
                self.scheduler.step()
                self.sampler.advance(self.stream.samples_per_step)
                self.step += 1

                real = sum(r for _, r, _ in micro)
                sq = sum(s for _, _, s in micro)
                total_loss, stop, real, sq = strategy.all_reduce_sum(
                    [float(loss_sum), float(self.preemption.requested), float(real), float(sq)]
                )
                loss = total_loss / global_targets if global_targets else 0.0
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self._non_finite(loss, grad_norm, micro)
                self.tokens_seen += int(real)
                window.add(
                    time.perf_counter() - t0,
                    t_data,
                    int(real),
                    int(global_targets),
                    self.flops.step_flops(int(real), int(sq)),
                )
                self.metrics.advance(1, loss)

                last = self.step == self.total_steps
                evaluating = self.step % cfg.evaluation_freq == 0 or last
                if self.step % cfg.save_steps == 0 or last or stop:  # [runs] saved before evaluating: an
                    self.save()  # evaluation failure never loses the step's checkpoint
                    saved_at = self.step
                extra = self.evaluate(val=True, generate=True) if evaluating else {}
                if self.step % cfg.log_interval == 0 or last or evaluating or stop:
                    self.metrics.write(self._record(loss, lr, grad_norm, int(global_targets), window, extra))
                    window = _Window()
                if stop:
                    sig = (
                        signal.Signals(self.preemption.signal).name
                        if self.preemption.signal
                        else "a signal on another rank"
                    )
                    self.metrics.message(
                        f"stopped by {sig} after step {self.step}; checkpoint written, resume with --resume auto"
                    )
                    return EXIT_PREEMPTED
                if evaluating or self.step == saved_at:
                    window.reset_clock()
            if self.step > saved_at:
                self.save()
            with strategy.full_parameters():  # ZeRO-3: gathered on every rank; main writes
                if env.is_main:
                    export_hf(self.hf_model, self.tokenizer, self.work_dir / "hf", cfg.export_dtype)
            if env.is_main:
                self.metrics.message(
                    f"done: {self.step} steps ({self.skipped_steps} skipped); Hugging Face model in "
                    f"{self.work_dir / 'hf'}"
                )
            strategy.barrier()
            return EXIT_OK
        finally:
            if "steps" in locals():
                steps.close()  # stops DataLoader workers now, also when training stops on an error
            self.preemption.restore()
            self.metrics.close()

    def train_step(self, micro: list) -> tuple[torch.Tensor, float, float, float]:
        """One optimizer step on this rank's micro-batches: (loss sum, global target count, lr, grad norm)."""
        strategy, device = self.strategy, self.env.device
        for batch, _, _ in micro:
            self._check_token_ids(batch)
        # Count the step's target tokens on all ranks before any backward.
        local_targets = sum(b.num_targets for b, _, _ in micro)
        (global_targets,) = strategy.all_reduce_sum([float(local_targets)])
        lr = self.scheduler.lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        if global_targets == 0:  # nothing to learn from: no forward, no backward, no update
            self.skipped_steps += 1
            strategy.zero_grad()
            return loss_sum, 0.0, lr, 0.0
        scale = strategy.loss_scale / global_targets
        for i, (batch, _, _) in enumerate(micro):
            batch = batch.to(device)
            with strategy.accumulate(is_last=i == len(micro) - 1):
                part = strategy.forward(batch.input_ids, batch.labels, batch.position_ids)
                if faults.FAULTS and faults.at_step("nan_loss_at_step", self.step + 1, self.env.rank):
                    part = part * math.nan
                strategy.backward(part * scale)
            loss_sum += part.detach()
        if faults.FAULTS and faults.at_step("inf_grad_at_step", self.step + 1, self.env.rank):
            next(p for p in strategy.unwrapped.parameters() if p.grad is not None).grad.fill_(math.inf)
        grad_norm = strategy.step(self.cfg.max_norm)  # a non-finite gradient norm applies no update
        return loss_sum, global_targets, lr, grad_norm

    def _non_finite(self, loss: float, grad_norm: float, micro: list) -> None:
        """A NaN/inf loss or gradient norm (the same on every rank): stop, naming the step and
        this rank's samples, or (nan_policy = 'skip') count the step as skipped. No update was
        applied either way (the engine skips the optimizer step on a non-finite norm)."""
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.cfg.nan_policy == "skip":
            self.skipped_steps += 1
            self.metrics.message(
                f"step {self.step}: non-finite {what}; update skipped (nan_policy='skip', "
                f"{self.skipped_steps} skipped so far)"
            )
            return
        raise TrainingDiverged(
            f"non-finite {what} at step {self.step}; batch of rank {self.env.rank}: {self._describe_samples(micro)}; "
            f"no checkpoint was written for it (last: {self.work_dir / 'checkpoints'}); lower lr, check those lines, "
            f"or set nan_policy = 'skip'"
        )

    def _describe_samples(self, micro: list, limit: int = 8) -> str:
        """'sample K (file:line, ...)' for the samples of a step, on one line."""
        parts = []
        ks = [k for b, _, _ in micro for k in b.indices]
        for k in ks[:limit]:
            try:
                src = self.train_set.sources(k)
            except Exception:  # a message must not fail
                src = []
            where = ", ".join(f"{f}:{line}" for f, line in src[:4]) + (
                f", +{len(src) - 4} more" if len(src) > 4 else ""
            )
            parts.append(f"sample {k} ({where})")
        return "; ".join(parts) + (f"; +{len(ks) - limit} more samples" if len(ks) > limit else "")

    def _check_token_ids(self, batch) -> None:
        """Token ids must be < the model's vocabulary size (else the embedding fails, or worse)."""
        if int(batch.input_ids.max()) < self.vocab_size and int(batch.labels.max()) < self.vocab_size:
            return
        for row, k in enumerate(batch.indices):
            ids, labels = batch.input_ids[row], batch.labels[row]
            bad = torch.nonzero((ids >= self.vocab_size) | (labels >= self.vocab_size))
            if not len(bad):
                continue
            pos = int(bad[0])
            token = int(max(ids[pos], labels[pos]))
            src = self.train_set.sources(k)
            cu = [int(c) for c in batch.cu_seqlens[row]]
            frag = sum(
                1 for c in cu[1:] if c <= pos
            )  # the document (fragment) holding the position; a label is its own document's next token
            where = f"{src[frag][0]}:{src[frag][1]}" if frag < len(src) else ", ".join(f"{f}:{line}" for f, line in src)
            raise DataError(
                f"{where}: token id {token} >= the model's vocabulary size {self.vocab_size} "
                f"(sample {k}); fix the data or use the tokenizer it was made with"
            )

    def _record(self, loss, lr, grad_norm, targets, window: _Window, extra: dict) -> dict:
        ws = self.env.world_size
        r = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.stream.epoch_progress(), 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "target_tokens": targets,
            "tokens": self.tokens_seen,
        }
        r.update(extra)
        if window.steps:
            wall = max(window.wall, 1e-9)
            tflops = window.flops / wall / 1e12 / ws  # per device
            r.update(
                tokens_per_s=window.tokens / wall,
                step_time=window.step_time / window.steps,
                data_time=window.data_time / window.steps,
                tflops=tflops,
                mfu=(tflops / self.peak) if self.peak else None,
            )
        r["memory_gb"] = memory_gb(self.env.device)
        r["elapsed"] = time.perf_counter() - self.t_start  # seconds since this process started training
        r["skipped_steps"] = self.skipped_steps
        return r


class _Window:
    """Throughput over the steps since the last log line (evaluation and checkpoint time excluded)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.step_time = self.data_time = 0.0
        self.tokens = self.targets = 0
        self.flops = 0.0
        self.paused = 0.0

    def add(self, step_time, data_time, tokens, targets, flops) -> None:
        self.steps += 1
        self.step_time += step_time
        self.data_time += data_time
        self.tokens += tokens
        self.targets += targets
        self.flops += flops
        self.last = time.perf_counter()

    def reset_clock(self) -> None:
        """Drop the time spent since the last step (evaluation, checkpoint) from the window."""
        self.paused += time.perf_counter() - getattr(self, "last", self.start)

    @property
    def wall(self) -> float:
        return getattr(self, "last", time.perf_counter()) - self.start - self.paused


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    from tokentrain.utils.atomic import atomic_file

    with atomic_file(path, "w") as f:
        f.write("".join(k + "\n" for k in keep))


def run(cfg: TrainConfig, env, work_dir: Path, resume: str | None, deepspeed: dict | None = None) -> int:
    trainer = Trainer(cfg, env, work_dir, resume, deepspeed)
    trainer.setup()
    return trainer.fit()
