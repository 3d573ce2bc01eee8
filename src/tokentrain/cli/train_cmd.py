"""`tokentrain train CFG ...` and `tokentrain make-tiny-model DIR`.

`train` loads and validates the config (one-line errors, before anything heavy), joins
the launcher's process group, and runs the trainer. With NPROC_PER_NODE set (and not
already under a launcher) `cli.main` starts torchrun instead, after `preflight`; that is
the one place that decides (`spawn.wants_spawn`). Exit codes: 0 done, 1 failure,
2 bad command line or config, 3 bad data, 75 preempted (checkpoint written; resume),
130 aborted by a second Ctrl-C (or Ctrl-C during start-up).

A work dir belongs to one run (tokentrain.run.workdir): the main rank locks it, and a
start without --resume on one that holds checkpoints is refused (or --overwrite).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from tokentrain.distributed.env import LAUNCHER_HELP, LAUNCHERS
from tokentrain.engines.specs import CHOICES
from tokentrain.errors import TokentrainError
from tokentrain.utils.disk import UNWRITABLE, what_failed


def add_train_arguments(p) -> None:
    p.add_argument("config", metavar="CFG", help="config file (see `tokentrain list-cfg` / `copy-cfg`)")
    p.add_argument(
        "--work-dir", metavar="DIR", help="checkpoints, logs, metrics and the final model (default: work_dirs/CFG_NAME)"
    )
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="none",
        help="; ".join(f"{name}: {how}" for name, how in LAUNCHER_HELP.items()),
    )
    p.add_argument(
        "--resume", metavar="auto|PATH", help="auto: newest complete checkpoint in the work dir; or a step_N folder"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a work dir that holds an earlier run: its checkpoints, metrics and export are "
        "deleted once the new run has written its first checkpoint (kept if it fails before)",
    )
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config settings")
    p.add_argument(
        "--deepspeed",
        metavar="NAME|JSON",
        help="DeepSpeed ZeRO: a preset (deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, "
        "deepspeed_zero3, deepspeed_zero3_offload) or a path to a DeepSpeed JSON; default: DDP",
    )
    p.add_argument(
        "--engine",
        choices=CHOICES,
        help="overrides the config's `engine` (default auto: deepspeed with --deepspeed, ddp on several ranks, "
        "else local)",
    )


def add_plan_arguments(p, flag: str = "") -> None:
    """The options of a plan (`tokentrain plan`, `train --dry-run`)."""
    g = p.add_argument_group(f"plan{flag}")
    g.add_argument("--world-size", type=int, metavar="N", help="ranks to plan for (default: the launcher's, else 1)")
    g.add_argument(
        "--gpu-memory", metavar="SIZE", help="GPU memory to check against, e.g. 80GiB (default: the visible GPU's)"
    )
    g.add_argument("--tokens-per-s", type=float, metavar="R", help="tokens/s of the whole job, for the time")
    g.add_argument(
        "--mfu",
        type=float,
        default=0.4,
        help="model FLOPs utilisation assumed for the time without --tokens-per-s (default 0.4)",
    )
    g.add_argument("--json", action="store_true", help="print the plan as JSON")


def register(sub, common) -> None:
    p = sub.add_parser("train", help="train a model from a config file", parents=[common])
    add_train_arguments(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (data, steps, model size, memory, checkpoint and export sizes, disk, time) and exit; "
        "loads no weights, writes nothing (= `tokentrain plan`)",
    )
    add_plan_arguments(p, " (with --dry-run)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "plan",
        help="what a training run will need, before it is queued (= train --dry-run)",
        parents=[common],
    )
    add_train_arguments(p)
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan, dry_run=True)

    p = sub.add_parser(
        "make-tiny-model", help="write a tiny random Llama + tokenizer folder (demo, tests)", parents=[common]
    )
    p.add_argument("out", metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)


def default_work_dir(config_path: str) -> Path:
    return Path("work_dirs") / Path(config_path).stem


def quiet_libraries() -> None:
    import transformers

    from tokentrain.engines.deepspeed import set_accelerator

    set_accelerator()  # before transformers imports DeepSpeed, which then probes (and warns about "no GPU")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_hub()


def quiet_hub() -> None:
    """huggingface_hub prints its warnings (a retry, ...) through its own handler *and* passes them
    to ours: every line twice. Ours alone prints them (time and rank prefixed)."""
    import logging

    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)


def work_dir_of(args, cfg) -> Path:
    return Path(args.work_dir or cfg.work_dir or default_work_dir(args.config))


def preflight(args, probe_lock: bool = False):
    """Every usage error of `train` (config, DeepSpeed config, model folder, --resume PATH, work
    dir), before anything heavy or anything is written: (config, DeepSpeed config or None).
    `probe_lock`: also refuse a work dir another run holds (the launcher's parent process)."""
    from tokentrain.checkpoint.fingerprint import check_ignore_keys
    from tokentrain.config.loader import load_config
    from tokentrain.run import workdir

    cfg = load_config(args.config, args.cfg_options, seed=args.seed)
    check_ignore_keys(cfg.resume_ignore)
    if getattr(args, "engine", None):
        cfg = cfg.replace(engine=args.engine)
    from tokentrain.engines.registry import choose

    choose(cfg.engine, deepspeed=bool(args.deepspeed), world_size=1)  # flag conflicts, before any rank starts
    from tokentrain.model.source import check_model_source

    # A hub id without network: one line, not a minute of retries (a plan reads no hub: not checked).
    check_model_source(cfg.pretrained_model_name_or_path, hub=not getattr(args, "dry_run", False))
    work_dir = work_dir_of(args, cfg)
    workdir.check_usable(work_dir)
    if probe_lock:
        workdir.WorkDirLock(work_dir).probe()
    workdir.check_start(work_dir, args.resume, args.overwrite)
    if args.resume and args.resume != "auto":
        from tokentrain.checkpoint.manager import resolve_resume

        resolve_resume(args.resume, Path(args.resume), verify=False)
    from tokentrain.data.checks import check_cache_root

    check_cache_root()
    deepspeed = None
    if args.deepspeed:
        from tokentrain.engines.deepspeed_config import load_deepspeed_config

        if not _importable("deepspeed"):  # the optional extra: a usage error, not ModuleNotFoundError later
            from tokentrain.errors import ConfigError

            raise ConfigError(
                f"--deepspeed {args.deepspeed}: DeepSpeed is not installed; pip install 'tokentrain[deepspeed]'"
            )

        deepspeed = check_deepspeed(args.deepspeed, load_deepspeed_config(args.deepspeed))
    return cfg, deepspeed


def _importable(module: str) -> bool:
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def check_deepspeed(source: str, ds) -> dict:
    """The shape of a user's DeepSpeed JSON, before DeepSpeed meets it."""
    from tokentrain.errors import ConfigError

    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed {source}: must be a JSON object {{...}}, got a {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"--deepspeed {source}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"--deepspeed {source}: zero_optimization.stage = {stage!r}: must be 0, 1, 2 or 3")
    # The trainer builds the optimizer and steps the lr schedule itself: DeepSpeed's own sections
    # would be ignored (optimizer) or fight ours (a WarmupLR left lr at 0 for a whole run).
    for section, keys in OWN_SECTIONS.items():
        if section in ds:
            kind = ds[section].get("type") if isinstance(ds[section], dict) else None
            raise ConfigError(
                f"--deepspeed {source}: the {section!r} section{f' ({kind})' if kind else ''} is not used, "
                f"tokentrain sets it from the training config; remove it and set {keys} there"
            )
    return ds


# DeepSpeed config sections the trainer replaces, and the training-config keys that do their job.
OWN_SECTIONS = {
    "optimizer": "lr, betas, weight_decay (AdamW)",
    "scheduler": "lr, warm_up_ratio, min_lr_ratio (warm-up then cosine)",
}


def cmd_plan(args) -> int:
    """The plan of `train` with the same arguments: preflight's checks, then figures from the
    config, the data's indices and the model's config.json; no weights, nothing written."""
    import json

    from tokentrain.plan.make import make_plan
    from tokentrain.plan.report import render

    cfg, deepspeed = preflight(args)
    if _launched_rank(args.launcher) > 0:  # every rank of a launched dry run checked; rank 0 prints the plan
        return 0
    quiet_libraries()
    plan = make_plan(args, cfg, deepspeed, work_dir_of(args, cfg))
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0


def _launched_rank(launcher: str) -> int:
    """This process's rank under torchrun/srun (0 when planned outside a launcher, where a dry run
    with `--launcher pytorch` is a plan of the job it will be)."""
    name = {"pytorch": "RANK", "slurm": "SLURM_PROCID"}.get(launcher)
    value = os.environ.get(name, "0") if name else "0"
    return int(value) if value.isdigit() else 0


def cmd_train(args) -> int:
    if args.dry_run:
        return cmd_plan(args)
    if plan_only := [f for f in ("world_size", "gpu_memory", "tokens_per_s", "json") if getattr(args, f)]:
        from tokentrain.errors import ConfigError

        raise ConfigError(f"--{plan_only[0].replace('_', '-')} is an option of the plan: add --dry-run")
    from tokentrain.checkpoint.safety import weights_only_everywhere

    weights_only_everywhere()  # every rank, before anything can load a checkpoint: no code from one
    if args.launcher != "none":  # a rank: it ends when its launcher dies (docs/reliability.md)
        from tokentrain.run.parent_watch import watch_launcher

        watch_launcher()
    cfg, deepspeed = preflight(args)  # (under NPROC_PER_NODE, cli.main spawned torchrun instead of calling this)
    work_dir = work_dir_of(args, cfg)
    cfg = cfg.replace(work_dir=str(work_dir))

    from tokentrain.distributed.env import destroy_distributed, init_distributed
    from tokentrain.run import workdir
    from tokentrain.run.signals import ignore_while_ending

    env = init_distributed(args.launcher)
    lock = None
    started = False  # the first checkpoint is written: what --overwrite set aside may go

    def on_started() -> None:
        nonlocal started
        started = True
        if env.is_main:
            workdir.drop_set_aside(work_dir)

    try:
        if not env.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        if env.is_main:
            lock = workdir.WorkDirLock(work_dir).acquire()  # held until this function returns
            workdir.restore_set_aside(work_dir)  # an --overwrite start killed before it began
            workdir.check_start(work_dir, args.resume, args.overwrite)  # again, now that no one else can write
            if args.overwrite:
                workdir.set_aside_previous_run(work_dir)  # deleted after the new run's first checkpoint
            workdir.drop_stale_outputs(work_dir)
        quiet_libraries()
        if env.is_main:
            shutil.copyfile(args.config, work_dir / Path(args.config).name) if Path(args.config).resolve() != (
                work_dir / Path(args.config).name
            ).resolve() else None
            logging.getLogger("tokentrain.train").info(
                "work dir %s, %d rank(s) on %s", work_dir, env.world_size, env.device
            )
        from tokentrain.training.trainer import run

        code = run(cfg, env, work_dir, args.resume, deepspeed, started=on_started)
        ignore_while_ending()
        if code:  # preempted: the checkpoint is written, every rank is on its way out with 75
            _keep_exit_code(env)
        return code
    except TokentrainError:
        _keep_exit_code(env)
        raise
    except OSError as e:  # the work dir's disk is full or became unwritable (metrics, logs, export)
        if e.errno not in UNWRITABLE:
            raise
        _keep_exit_code(env)
        raise disk_error(e, work_dir) from e
    finally:
        if lock is not None:
            if not started:
                workdir.restore_set_aside(work_dir)  # the old run stays whole when the new one cannot start
            lock.release()
        destroy_distributed()


def disk_error(e: OSError, work_dir: Path) -> TokentrainError:
    from tokentrain.checkpoint.manager import find_latest

    what = what_failed(e)
    try:
        free = f" ({shutil.disk_usage(work_dir).free / 2**20:.1f} MiB free)"
    except OSError:
        free = ""
    last = find_latest(work_dir / "checkpoints", verify=False)
    keep = f"the last checkpoint {last} is intact" if last else "no checkpoint was written yet"
    return TokentrainError(
        f"{e.filename or work_dir}: {what}{free} while writing the run's outputs; {keep}: fix it, then "
        "resume with --resume auto"
    )


def _keep_exit_code(env) -> None:
    """This rank is ending with its own code (the others usually with the same one): a
    launcher's SIGTERM to the job when the first rank exits (srun --kill-on-bad-exit,
    torchrun) must not replace it with 143."""
    from tokentrain.run.signals import ignore_while_ending

    if env.world_size > 1:
        ignore_while_ending(interrupt=False)


def cmd_make_tiny_model(args) -> int:
    from tokentrain.model.tiny import make_tiny_model

    quiet_libraries()
    out = make_tiny_model(args.out, args.vocab_size, args.hidden_size, args.layers, args.heads, seed=args.seed)
    print(out)
    return 0
