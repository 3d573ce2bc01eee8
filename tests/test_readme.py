"""The README stays true: every command in its `bash` blocks runs, in order, on tiny inputs.

The blocks are run as one bash script (so `export` carries over) in an empty folder that
sees the repo's demo/ assets, with the venv's `tokentrain` on PATH, a real Slurm for the
srun line, and the README's Step 2 (editing PART 1) done the way a user would.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokentrain.distributed.spawn import _free_port

ROOT = Path(__file__).resolve().parents[1]
COPY = "internlm_7b_full_intern_repo_dataset_template_copy.py"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                cmds.append(line)
    return cmds


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:8]
    assert any(h.startswith("make demo") for h in head) and any(h.startswith("make test") for h in head)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, slurm_cluster):
    cmds = [c for c in readme_commands() if not c.startswith("make ")]
    assert any(c.startswith("srun") for c in cmds) and any("torch.distributed.launch" in c for c in cmds)
    script = ["set -euo pipefail", "set -x"]
    for c in cmds:
        script.append(c)
        if c.startswith("tokentrain copy-cfg internlm_7b_full_intern_repo_dataset_template"):
            # README Step 2: the user edits the two paths of PART 1.
            script.append(
                f"sed -i \"s#^pretrained_model_name_or_path = .*#pretrained_model_name_or_path = '$MODEL'#; "
                f"s#^dataset_folder = .*#dataset_folder = '$DATA'#\" {COPY}"
            )
    (tmp_path / "demo").symlink_to(ROOT / "demo")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "NPROC"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        SRUN_ARGS="-N1 -n2 --kill-on-bad-exit=1",
        TOKENTRAIN_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        MASTER_PORT=str(_free_port()),
    )
    r = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
    )
    assert r.returncode == 0, r.stderr[-6000:]
    for run in ("exp", "slurm", "torchrun", "launch", "nproc"):
        assert (tmp_path / "work_dirs" / run / "hf" / "config.json").is_file(), run
    assert (tmp_path / "hf_out" / "config.json").is_file()
    assert list((tmp_path / "work_dirs" / "exp").glob("*.png"))
