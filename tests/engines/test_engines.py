"""DDP and DeepSpeed ZeRO on 2 real gloo ranks: same parameters as one process, exact resume,
and the launchers of the seed (torchrun, python -m torch.distributed.launch, NPROC_PER_NODE,
a simulated two-node job, a real srun) on the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engines.engine_helpers import torchrun_cmd, write_cfg
from tokentrain.distributed.spawn import _free_port

HERE = Path(__file__).parent
ENGINES = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC", "NPROC_PER_NODE"))
    }
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def weights(work: Path) -> dict:
    return load_file(str(work / "hf" / "model.safetensors"))


def losses(work: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (work / "metrics.jsonl").read_text().splitlines() if r.strip()]


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / max(b[k].double().norm(), 1e-12)) for k in a)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny model and dataset, and the single-process reference on the same global batches."""
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("engines")
    model = make_tiny_model(root / "model", vocab_size=512, hidden_size=32, layers=2, heads=4)
    data = root / "data"
    synth_dataset(data, files=2, documents=300, seed=3, mean_length=40, vocab_size=512)
    cfg = root / "cfg.py"
    write_cfg(cfg, model, data)  # the engines suite's settings (tests/engines/engine_helpers.py)
    ref = root / "reference"
    # One process, micro-batch 1 x 4 accumulation = the 2 ranks x 2 accumulation global batch.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrain",
            "train",
            str(cfg),
            "--work-dir",
            str(ref),
            "--cfg-options",
            "accumulative_counts=4",
        ],
        env=clean_env(TOKENTRAIN_CACHE=str(root / "cache")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(root=root, model=model, data=data, cfg=cfg, ref=ref, cache=str(root / "cache"))


@pytest.fixture(scope="module")
def engines_run(job):
    """Every engine on 2 ranks (engines_worker.py): a full run and one resumed from step 2.
    Two tests read it; under xdist the module is one group (tests/conftest.py), so it runs once."""
    out = job["root"] / "engines"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(HERE / "engines_worker.py"),
        str(out),
        str(job["model"]),
        str(job["data"]),
        ",".join(ENGINES),
    ]
    r = subprocess.run(cmd, env=clean_env(TOKENTRAIN_CACHE=job["cache"]), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-5000:]
    return out


def test_every_engine_matches_one_process_and_resumes_exactly(job, engines_run):
    out = engines_run
    ref_w, ref_loss = weights(job["ref"]), losses(job["ref"])
    assert len(ref_loss) == 4
    for engine in ENGINES:
        full, resumed = out / engine / "full", out / engine / "resumed"
        assert rel_diff(weights(full), ref_w) <= 1e-5, engine
        assert losses(full) == pytest.approx(ref_loss, rel=1e-5), engine
        # Resumed from step 2: bit-identical to the uninterrupted run of the same engine.
        assert losses(resumed) == losses(full), engine
        w_full, w_res = weights(full), weights(resumed)
        assert all(torch.equal(w_full[k], w_res[k]) for k in w_full), engine
        assert (full / "checkpoints" / "step_4" / "COMPLETE").is_file()
    assert (out / "deepspeed_zero1" / "full" / "checkpoints" / "step_2" / "ds").is_dir()


def test_convert_deepspeed_and_plain_checkpoints_to_hf(job, engines_run, tmp_path):
    """pth_to_hf on a ZeRO-3 checkpoint (from the engines run) and on a plain one: loads in
    transformers with the trainer's own weights, hence identical logits."""
    from transformers import AutoModelForCausalLM

    engines_out = engines_run
    assert (engines_out / "deepspeed_zero3" / "DONE").exists()
    ids = torch.arange(5, 40)[None]
    for ckpt, hf in (
        (
            engines_out / "deepspeed_zero3" / "full" / "checkpoints" / "step_4",
            engines_out / "deepspeed_zero3" / "full" / "hf",
        ),
        (job["ref"], job["ref"] / "hf"),
    ):
        out = tmp_path / ckpt.parent.parent.name
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokentrain",
                "convert",
                "pth_to_hf",
                str(job["cfg"]),
                str(ckpt),
                str(out),
                "--safe-serialization",
            ],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert (
            any(out.glob("*.safetensors"))
            and (out / "config.json").is_file()
            and (out / "tokenizer_config.json").is_file()
        )
        a = AutoModelForCausalLM.from_pretrained(out).eval()
        b = AutoModelForCausalLM.from_pretrained(hf).eval()
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)


def _launch_and_compare(job, work: Path, cmd: list[str], env: dict, timeout: int = 300) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert rel_diff(weights(work), weights(job["ref"])) <= 1e-5
    assert losses(work) == pytest.approx(losses(job["ref"]), rel=1e-5)


def test_torch_distributed_launch_form_of_the_seed(job, tmp_path):
    """`python -m torch.distributed.launch ... <train module> cfg --deepspeed deepspeed_zero1
    --launcher pytorch --work-dir DIR`, as in the seed (it passes --local-rank)."""
    work = tmp_path / "w"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.launch",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "--nnodes=1",
        "--node_rank=0",
        "-m",
        "tokentrain.train",
        str(job["cfg"]),
        "--deepspeed",
        "deepspeed_zero1",
        "--launcher",
        "pytorch",
        "--work-dir",
        str(work),
    ]
    _launch_and_compare(job, work, cmd, clean_env(TOKENTRAIN_CACHE=job["cache"]))


def test_simulated_two_node_torchrun_equals_one_node(job, tmp_path):
    work, port = tmp_path / "w", _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={n}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "tokentrain.train",
                str(job["cfg"]),
                "--launcher",
                "pytorch",
                "--work-dir",
                str(work),
            ],
            env=clean_env(TOKENTRAIN_CACHE=job["cache"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert rel_diff(weights(work), weights(job["ref"])) <= 1e-5


def test_nproc_per_node_spawns_torchrun(job, tmp_path):
    work = tmp_path / "w"
    cmd = [
        sys.executable,
        "-m",
        "tokentrain",
        "train",
        str(job["cfg"]),
        "--work-dir",
        str(work),
        "--deepspeed",
        "deepspeed_zero2",
    ]
    _launch_and_compare(
        job, work, cmd, clean_env(TOKENTRAIN_CACHE=job["cache"], NPROC_PER_NODE="2", PORT=str(_free_port()))
    )


def test_real_srun_with_slurm_launcher_and_zero1(job, tmp_path, slurm_cluster):
    """The seed's command: srun tokentrain train cfg.py --launcher slurm --deepspeed deepspeed_zero1."""
    work = tmp_path / "w"
    tt = str(Path(sys.executable).with_name("tokentrain"))
    cmd = [
        "srun",
        "-N1",
        "-n2",
        "--kill-on-bad-exit=1",
        tt,
        "train",
        str(job["cfg"]),
        "--launcher",
        "slurm",
        "--deepspeed",
        "deepspeed_zero1",
        "--work-dir",
        str(work),
    ]
    _launch_and_compare(job, work, cmd, clean_env(TOKENTRAIN_CACHE=job["cache"], MASTER_PORT=str(_free_port())))


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_a_killed_rank_ends_the_whole_job(job, tmp_path, launcher, request):
    """kill -9 of one rank mid-training: every rank exits, non-zero, within 60 s; no hang."""
    if launcher == "srun":
        request.getfixturevalue("slurm_cluster")
    work = tmp_path / "w"
    tt = str(Path(sys.executable).with_name("tokentrain"))
    args = [str(job["cfg"]), "--work-dir", str(work), "--cfg-options", "max_iters=100000", "save_steps=100000"]
    if launcher == "torchrun":
        cmd = torchrun_cmd(*args)
        env = clean_env(TOKENTRAIN_CACHE=job["cache"])
    else:
        cmd = [
            "srun",
            "-N1",
            "-n2",
            "--kill-on-bad-exit=1",
            f"--job-name={work.parent.name}",
            tt,
            "train",
            *args,
            "--launcher",
            "slurm",
        ]
        env = clean_env(TOKENTRAIN_CACHE=job["cache"], MASTER_PORT=str(_free_port()))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    ranks: list[int] = []
    try:
        metrics = work / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.5)
        ranks = _rank_pids(str(work))
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        rc = proc.wait(timeout=90)
        elapsed = time.time() - t0
        assert rc != 0 and elapsed < 60, (rc, elapsed)
        time.sleep(1)
        assert all(not _alive(p) for p in ranks), "a rank outlived the job"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in ranks:  # torchrun starts its workers in their own sessions: never leave one behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if launcher == "srun":  # a killed srun leaves its job's steps running: cancel the job itself
            subprocess.run(["scancel", f"--name={work.parent.name}"], capture_output=True)


def _rank_pids(marker: str) -> list[int]:
    """This job's training ranks: processes running tokentrain's trainer whose command line
    holds `marker` (the job's work dir), not the launchers around them. Other tokentrain
    jobs on the machine are never picked."""
    # -ww: full command lines (ps cuts them to $COLUMNS, which pytest sets, and the marker is at the end)
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if (
            marker in args
            and ("tokentrain.train" in args or " train " in args)
            and not any(launcher in args for launcher in ("torch.distributed.run", "srun ", "slurmstepd"))
        ):
            pids.append(int(pid))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()
