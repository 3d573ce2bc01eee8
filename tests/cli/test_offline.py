"""A hub id with no network: one line naming a local folder and HF_HUB_OFFLINE, at once, through
the real command line (no retries: before, ~53 s of doubled retry lines, then an error saying
neither). The hub endpoint is a local port: closed (refused) or with a full backlog (a connect
that never answers, as a firewalled network does)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import write_config

TT = [sys.executable, "-m", "tokentrain"]
HUB_ID = "internlm/internlm-7b"  # the templates' default
# Far below transformers' retries (~53 s), far above the check's 2 s probe on a loaded machine:
# the measured figure is in docs/benchmarks.md ("Hub id without network").
NO_RETRIES_S = 30
NETWORK_SETTINGS = {"HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY"}


@pytest.fixture
def closed_port():
    """A port bound and not listening: a connect is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def silent_port():
    """A port whose one-slot backlog is full: a connect neither succeeds nor fails."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    yield port
    filler.close()
    server.close()


def _tokentrain(tmp_path: Path, *argv, **env) -> tuple[subprocess.CompletedProcess, float]:
    full = {k: v for k, v in os.environ.items() if k not in NETWORK_SETTINGS}
    full.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1", **env)
    t0 = time.monotonic()
    r = subprocess.run([*TT, *map(str, argv)], env=full, capture_output=True, text=True, timeout=300)
    return r, time.monotonic() - t0


def _train(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    cfg = write_config(tmp_path / "run.py", pretrained_model_name_or_path=HUB_ID, dataset_folder=str(tmp_path))
    return _tokentrain(tmp_path, "train", cfg, "--work-dir", tmp_path / "work", **env)


@pytest.mark.parametrize("port", ["closed_port", "silent_port"])
def test_unreachable_hub_fails_in_one_line(port, tmp_path, request):
    endpoint = f"http://127.0.0.1:{request.getfixturevalue(port)}"
    r, seconds = _train(tmp_path, HF_ENDPOINT=endpoint)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"tokentrain: error: pretrained_model_name_or_path = '{HUB_ID}': not a local folder")
    assert f"the Hugging Face hub is unreachable ({endpoint}: " in lines[0]
    assert "give a local model folder" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert ("refused" in lines[0]) == (port == "closed_port")
    assert seconds < NO_RETRIES_S
    assert not (tmp_path / "work").exists()


def test_data_check_refuses_it_too_and_a_plan_needs_no_hub(tiny_data, tmp_path, closed_port):
    cfg = write_config(tmp_path / "run.py", pretrained_model_name_or_path=HUB_ID, dataset_folder=str(tiny_data))
    endpoint = f"http://127.0.0.1:{closed_port}"
    plan, _ = _tokentrain(tmp_path, "plan", cfg, "--json", HF_ENDPOINT=endpoint)
    assert plan.returncode == 0, plan.stderr  # what it needs of a hub id it says it does not know
    r, _ = _tokentrain(tmp_path, "data", "check", "--config", cfg, HF_ENDPOINT=endpoint)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tokentrain: error: pretrained_model_name_or_path = '{HUB_ID}': not a local folder"), last
    assert f"the Hugging Face hub is unreachable ({endpoint}: " in last
    assert "Retrying" not in r.stderr


def test_offline_without_the_model_in_the_cache(tmp_path):
    r, seconds = _train(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"'{HUB_ID}': not a local folder and not in the local Hugging Face cache" in lines[0]
    assert str(tmp_path / "hf_home" / "hub") in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert seconds < NO_RETRIES_S


def test_a_cached_hub_id_is_used_offline_when_the_hub_is_unreachable(tiny_model, tmp_path, closed_port):
    """The hub's cache layout (refs/main -> snapshots/<commit>/): what a download left there."""
    commit = "0" * 40
    repo = tmp_path / "hf_home" / "hub" / "models--tiny--llama"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r, _ = _tokentrain(
        tmp_path, "generate", "tiny/llama", "--prompt", "Hi", "--max-new-tokens", 2, "--jsonl",
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny/llama: the Hugging Face hub is unreachable" in r.stderr and "using the local cache" in r.stderr
    assert "Retrying" not in r.stderr
    assert json.loads(r.stdout)["new_tokens"] >= 1


def test_hub_warnings_are_printed_once():
    """huggingface_hub has its own stderr handler and passes its records on to ours: its retry
    lines came twice. After the libraries are quietened, once, in the log's format."""
    code = (
        "import logging; from tokentrain.cli.main import setup_logging; "
        "from tokentrain.cli.train_cmd import quiet_libraries; setup_logging(False); quiet_libraries(); "
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "Retrying in 1s" in line]
    assert len(lines) == 1 and lines[0].startswith("[tokentrain] "), r.stderr
