"""`tokentrain generate` and `tokentrain chat` through the real command line, on the export of a
short training run: greedy output is transformers' own `model.generate`, a piped chat streams
its answers and keeps (and /reset clears) the history, and a folder with nothing to talk to is
one line."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_config, train

TT = [sys.executable, "-m", "tokentrain"]
NEW = 12


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _run(*argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TT, *map(str, argv)], input=stdin, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def work_dir(tiny_model, tiny_data, tmp_path_factory):
    """A two-step run: its work dir, with the export `hf/` and the checkpoint `step_2`."""
    work = tmp_path_factory.mktemp("chat") / "work"
    assert train(make_config(tiny_model, tiny_data, max_iters=2), work) == 0
    assert (work / "hf" / "model.safetensors").is_file() and (work / "checkpoints" / "step_2").is_dir()
    return work


def _reference(work_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work_dir / "hf")
    model = AutoModelForCausalLM.from_pretrained(work_dir / "hf", dtype=torch.float32).eval()

    def greedy(text: str, *, templated: bool) -> tuple[str, int]:
        enc = tok(text, return_tensors="pt", add_special_tokens=not templated)
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1] :]
        return tok.decode(new, skip_special_tokens=True), int(new.shape[0])

    return tok, greedy


def test_generate_is_greedy_model_generate(work_dir):
    prompts = ["Hello", "The cat sat on"]
    flags = ["--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", NEW, "--jsonl"]
    r = _run("generate", work_dir, *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    tok, greedy = _reference(work_dir)
    assert [row["prompt"] for row in rows] == prompts
    for row in rows:
        assert (row["completion"], row["new_tokens"]) == greedy(row["prompt"], templated=False)

    step = work_dir / "checkpoints" / "step_2"  # the same fp32 weights, converted in memory
    assert _run("generate", step, *flags).stdout == r.stdout

    chat = _run("generate", work_dir / "hf", "--prompt", prompts[0], "--chat", "--max-new-tokens", NEW, "--jsonl")
    assert chat.returncode == 0, chat.stderr[-2000:]
    messages = [{"role": "user", "content": prompts[0]}]
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert json.loads(chat.stdout)["completion"] == greedy(templated, templated=True)[0]


def _read_some(stream, seconds: float) -> bytes:
    """What the process has written to `stream` within `seconds` (without waiting for its end)."""
    ready, _, _ = select.select([stream], [], [], seconds)
    return os.read(stream.fileno(), 1 << 16) if ready else b""


def test_chat_streams_keeps_history_and_resets(work_dir):
    proc = subprocess.Popen(
        [*TT, "chat", str(work_dir), "--max-new-tokens", str(NEW), "--verbose"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"Hello\n")
    proc.stdin.flush()
    first = _read_some(proc.stdout, 240)
    assert first and proc.poll() is None  # the answer arrives while the chat waits for more input
    out, err = proc.communicate(b"Hello\n/reset\nHello\n", timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]

    tok, greedy = _reference(work_dir)
    user = {"role": "user", "content": "Hello"}
    one = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    reply = greedy(one, templated=True)[0]
    two = tok.apply_chat_template(
        [user, {"role": "assistant", "content": reply}, user], tokenize=False, add_generation_prompt=True
    )
    sizes = [int(line.split()[1]) for line in err.decode().splitlines() if line.startswith("[prompt: ")]
    count = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in (one, two)]
    assert sizes == [count[0], count[1], count[0]]  # turn 2 holds turn 1; after /reset it starts afresh
    assert (first + out).decode().startswith(reply)
    assert "(history cleared)" in err.decode()


def test_chat_without_a_template_speaks_plain_text_said_once(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    r = _run("chat", bare, "--max-new-tokens", 4, "--verbose", stdin="Hi\nHow are you?\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("no chat template") == 1
    sizes = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("[prompt: ")]
    assert len(sizes) == 2 and sizes[1] > sizes[0]


def test_nothing_to_talk_to_is_one_line(work_dir, tmp_path):
    for name in ("empty", "step_3"):
        (tmp_path / name).mkdir()
    cases = {
        tmp_path / "empty": "no model here (no config.json, no hf/ folder, no checkpoints)",
        tmp_path / "missing": "model folder does not exist",
        tmp_path / "step_3": "step_3: checkpoint is incomplete (no COMPLETE marker); give another one",
    }
    for folder, says in cases.items():
        r = _run("generate", folder, "--prompt", "Hi")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr, r.stderr
    r = _run("generate", work_dir)
    assert r.returncode == 2 and "no prompt: give --prompt TEXT" in r.stderr, r.stderr
