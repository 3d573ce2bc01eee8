"""Run under torchrun (2 ranks): train the same tiny job under several engines in ONE launch.

For each engine: a full run of 4 steps (checkpoint at 2), then a resumed run that starts
from a copy of that step-2 checkpoint. The test compares the exported weights and losses
with a single-process run on the same global batches. One launch for every engine keeps
the fixed start-up cost (~10 s) paid once.

    torchrun --nproc_per_node=2 engines_worker.py OUT MODEL DATA ENGINE[,ENGINE...]
"""

import json
import shutil
import sys
from pathlib import Path

from tokentrain.config.loader import build_config
from tokentrain.distributed.env import destroy_distributed, init_distributed
from tokentrain.engines.deepspeed_config import load_deepspeed_config
from tokentrain.training.trainer import Trainer

SETTINGS = dict(
    max_length=128,
    batch_size=1,
    accumulative_counts=2,
    max_iters=4,
    lr=1e-3,
    warm_up_ratio=0.25,
    save_steps=2,
    save_total_limit=-1,
    evaluation_freq=1000,
    evaluation_inputs=[],
    log_interval=1,
    tensorboard=False,
    dtype="float32",
    seed=7,
)


def train(cfg, env, work: Path, engine: str, resume=None) -> None:
    ds = None if engine == "ddp" else load_deepspeed_config(engine)
    t = Trainer(cfg.replace(work_dir=str(work)), env, work, resume, ds)
    t.setup()
    assert t.fit() == 0
    if hasattr(t.engine, "close"):
        t.engine.close()  # ZeRO-3: the next engine builds its model whole again


def main() -> None:
    out, model, data, engines = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    env = init_distributed("pytorch", timeout_s=120)
    cfg = build_config(dict(SETTINGS, pretrained_model_name_or_path=model, dataset_folder=data), "<engines test>")
    for engine in engines:
        full, resumed = out / engine / "full", out / engine / "resumed"
        train(cfg, env, full, engine)
        if env.is_main:
            (resumed / "checkpoints").mkdir(parents=True)
            shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
            (resumed / "checkpoints" / "latest").write_text("step_2\n")
            shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
        t_barrier(env)
        train(cfg, env, resumed, engine, resume="auto")
        if env.is_main:
            (out / engine / "DONE").write_text(json.dumps({"engine": engine}))
    destroy_distributed()


def t_barrier(env) -> None:
    import torch.distributed as dist

    if env.distributed:
        dist.barrier()


if __name__ == "__main__":
    main()
