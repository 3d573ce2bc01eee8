"""`make test` runs `pytest -n 2 --dist loadgroup` and counts on its groups: the Slurm tests in
one worker, and a module's tests that read one module-scoped run (a multi-rank engine run, a
set of checkpoints) in one worker, in a row, so the run is made once (tests/conftest.py).
pytest 9.2 with pytest-xdist 3.8 silently grouped nothing; this checks the installed pair does."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULE = '''
import os
import pytest

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    with open(os.environ["SETUPS"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_reads_the_shared_run(shared, i):
    with open(os.environ["RUNS"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_other(i):
    pass
'''


def test_a_modules_shared_run_is_made_once_in_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (the suite's grouping)\n"
    )
    (tmp_path / "test_shared.py").write_text(MODULE)
    setups, runs = tmp_path / "setups.txt", tmp_path / "runs.txt"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-rN"],
        cwd=tmp_path,
        env={**os.environ, "SETUPS": str(setups), "RUNS": str(runs)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(setups.read_text().split()) == 1, "the module-scoped run was made more than once"
    assert len(set(runs.read_text().split())) == 1, "the module's tests were spread over the workers"
