import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm on loopback (Debian's slurm-wlm), started once per session."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start slurmctld/slurmd and need root (as on CI)")
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_localhost.sh"), "start"], check=True, timeout=300)
    assert shutil.which("srun")
    yield
