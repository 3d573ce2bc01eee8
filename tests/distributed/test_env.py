"""Launcher environments: parsed right, and a real srun / torchrun job forms one gloo group."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tokentrain.distributed import env as denv
from tokentrain.distributed import spawn
from tokentrain.errors import ConfigError

pytestmark = pytest.mark.distributed  # starts several processes

PROBE = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from tokentrain.distributed.env import init_distributed, destroy_distributed
    e = init_distributed(sys.argv[1], timeout_s=60)
    t = torch.tensor([float(e.rank + 1)])
    dist.all_reduce(t)
    import os
    omp = os.environ.get('OMP_NUM_THREADS')
    print(f"rank={e.rank} world={e.world_size} local={e.local_rank}/{e.local_world_size} sum={t.item():g} "
          f"omp={omp} dev={e.device.type}\\n", end="", flush=True)
    destroy_distributed()
    """
)


def _clean_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "OMP_NUM"))
    }
    env.update(extra)
    return env


def test_slurm_env_parsing(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x3),2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-10]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: our own expansion of the simple form
    info = denv.read_launcher_env("slurm")
    assert info == dict(rank=5, world=8, local_rank=1, local_world=2, addr="gpu07", port=str(20000 + 123456 % 20000))
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29999")
    info = denv.read_launcher_env("slurm")
    assert (info["addr"], info["port"]) == ("10.1.2.3", "29999")


def test_missing_launcher_env_is_a_config_error(monkeypatch):
    for k in ("SLURM_PROCID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="SLURM_PROCID is not set"):
        denv.read_launcher_env("slurm")
    with pytest.raises(ConfigError, match="WORLD_SIZE is not set"):
        denv.read_launcher_env("pytorch")
    with pytest.raises(ConfigError, match="unknown launcher"):
        denv.read_launcher_env("mpi")


def test_the_cli_offers_the_launchers_of_the_one_table():
    import argparse

    from tokentrain.cli.train_cmd import add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    launcher = next(a for a in p._actions if a.dest == "launcher")
    assert launcher.choices == denv.LAUNCHERS and all(f"{n}:" in (launcher.help or "") for n in denv.LAUNCHERS)


def test_tasks_per_node_forms():
    assert denv._slurm_tasks_on_node("4", 0) == 4
    assert denv._slurm_tasks_on_node("2(x3),1", 2) == 2
    assert denv._slurm_tasks_on_node("2(x3),1", 3) == 1


def test_real_srun_forms_a_gloo_group(slurm_cluster):
    out = subprocess.run(
        ["srun", "-N1", "-n2", sys.executable, "-c", PROBE, "slurm"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    assert out.returncode == 0, out.stderr
    lines = sorted(re.findall(r"rank=.*?dev=\w+", out.stdout))
    assert len(lines) == 2, out.stdout
    for r, line in enumerate(lines):
        # 1 + 2 summed over both ranks; threads shared out between the 2 ranks of the node
        assert line.startswith(f"rank={r} world=2 local={r}/2 sum=3 omp={max(1, os.cpu_count() // 2)} dev=cpu"), line


def test_real_torchrun_forms_a_gloo_group(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            str(spawn._free_port()),
            str(script),
            "pytorch",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    assert out.returncode == 0, out.stderr
    # Ranks share one pipe; their lines may interleave without a newline between.
    assert sorted(re.findall(r"rank=\d world=\d local=\d/\d sum=\d", out.stdout)) == [
        "rank=0 world=2 local=0/2 sum=3",
        "rank=1 world=2 local=1/2 sum=3",
    ], out.stdout + out.stderr


def test_spawn_command_and_exit_code_choice(tmp_path):
    cmd = spawn.torchrun_command(
        ["cfg.py", "--launcher", "none", "--work-dir", "w"], {"NPROC_PER_NODE": "2", "PORT": "1234"}
    )
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--master_port=1234" in cmd
    assert cmd[-6:] == ["tokentrain.train", "cfg.py", "--work-dir", "w", "--launcher", "pytorch"]
    assert spawn.wants_spawn({"NPROC_PER_NODE": "2"})
    assert not spawn.wants_spawn({"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"})
    (tmp_path / "rank1.code").write_text("3")
    (tmp_path / "rank0.code").write_text("0")
    assert spawn.job_exit_code(1, tmp_path) == 3
    (tmp_path / "rank0.code").write_text("75")
    assert spawn.job_exit_code(1, tmp_path) == 75
    assert spawn.job_exit_code(0, tmp_path) == 0
