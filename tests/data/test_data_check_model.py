"""`data check --model / --config`: the data held against a model, through the real CLI, and
`train` refusing ids over the vocabulary at start, before the model is built."""

from __future__ import annotations

import random
from pathlib import Path

from tests.conftest import VOCAB
from tests.helpers import write_config

from .helpers import line_bytes, tt, write_bin


def _over_vocab(root: Path) -> tuple[Path, int, Path]:
    """a.bin within the vocabulary; b.bin with id VOCAB + 88 (as a masked -id) on its 3rd line;
    c.bin with VOCAB itself on its 1st. Returns (b, byte of its bad line, c)."""
    write_bin(root / "a.bin", [[1, 2, 3], [VOCAB - 1, -(VOCAB - 1)]])
    mb = write_bin(root / "b.bin", [[5, 6], [7], [8, -(VOCAB + 88), 9], [VOCAB + 3]])
    write_bin(root / "c.bin", [[VOCAB]])
    return root / "b.bin", int(mb[2, 0]), root / "c.bin"


def test_ids_over_the_vocabulary_named_by_file_line_and_byte(tmp_path, tiny_model):
    b, byte, c = _over_vocab(tmp_path / "d")
    r = tt("data", "check", tmp_path / "d", cache=tmp_path / "cache")
    assert r.returncode == 0 and r.stdout == "", r.stderr  # the format alone is fine: the old check passed it
    r = tt("data", "check", tmp_path / "d", "--model", tiny_model, cache=tmp_path / "cache")
    assert r.returncode == 1, r.stderr  # the exit code of any other problem data check finds
    what = f">= the vocabulary size {VOCAB} of {tiny_model}"
    assert r.stdout.splitlines() == [
        f"{b}: line 3 (byte {byte}): token id {VOCAB + 88} (the file's largest) {what}; tokenize the data with "
        "this model's tokenizer, or train a model whose vocabulary holds it",
        f"{c}: line 1 (byte 0): token id {VOCAB} (the file's largest) {what}; tokenize the data with this "
        "model's tokenizer, or train a model whose vocabulary holds it",
    ]
    assert f"checked 3 file(s) against {tiny_model} (vocabulary {VOCAB}): 2 problem(s)" in r.stderr


def test_a_missing_model_is_a_usage_error(tmp_path):
    write_bin(tmp_path / "d" / "a.bin", [[1, 2]])
    r = tt("data", "check", tmp_path / "d", "--model", tmp_path / "nope", cache=tmp_path / "cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith(f"--model {tmp_path / 'nope'}: no config.json there; give the model's folder")
    )


def test_config_gives_the_model_the_data_and_max_length(tmp_path, tiny_model):
    data, val = tmp_path / "train", tmp_path / "val"
    m = write_bin(data / "a.bin", [[1, 2, 3], [-4, -5, -6], list(range(1, 21)), [7]])
    mv = write_bin(val / "v.bin", [[1, 2], [3, VOCAB + 1]])
    cfg = write_config(
        tmp_path / "cfg.py",
        pretrained_model_name_or_path=str(tiny_model),
        dataset_folder=str(data),
        val_dataset_folder=str(val),
        max_length=8,
    )
    r = tt("data", "check", "--config", cfg, cache=tmp_path / "cache")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        f"{val / 'v.bin'}: line 2 (byte {int(mv[1, 0])}): token id {VOCAB + 1} (the file's largest) >= the "
        f"vocabulary size {VOCAB} of {tiny_model}; tokenize the data with this model's tokenizer, or train a "
        "model whose vocabulary holds it"
    ]
    assert len(m) == 4
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note: ")]
    assert notes == [
        f"note: dataset_folder = {str(data)!r}: 2 of 4 non-empty document(s) have no target token (they add no loss)",
        f"note: dataset_folder = {str(data)!r}: 1 document(s) longer than max_length=8 (longest 20 tokens); "
        "packed: each is cut across consecutive samples of max_length, none of it lost",
    ]


def test_a_dataset_with_no_target_is_a_problem(tmp_path, tiny_model):
    write_bin(tmp_path / "d" / "a.bin", [[1, -2, -3], [4], [-5, -6]])
    r = tt("data", "check", tmp_path / "d", "--model", tiny_model, cache=tmp_path / "cache")
    assert r.returncode == 1
    assert r.stdout.startswith(f"{tmp_path / 'd'}: no document has a target token")


def _mixed_corpus(root: Path, seed: int) -> list[int]:
    """~600 KB over 3 files: usual lines (compact and json.dumps-spaced), with, in the middle of
    the big file, blank lines, a malformed line, a float, and an id over the vocabulary; and a
    file with no meta. Returns the 1-based line numbers of the big file's bad lines."""
    rng = random.Random(seed)
    lines, bad = [], []
    for i in range(4000):
        toks = [rng.choice((-1, 1)) * rng.randint(1, VOCAB - 1) for _ in range(rng.randint(1, 60))]
        lines.append(line_bytes(toks, b"", spaced=i % 3 == 0))
        if i in (1500, 2600):
            lines += [b"", b""]
        if i in (1000, 3000):
            lines.append(b'{"tokens": [1, 2.5]}')
            bad.append(len(lines))
        if i == 2000:
            lines.append(line_bytes([3, VOCAB + 7, 4], b""))
    write_bin(root / "big.bin", None, raw_lines=lines)
    write_bin(root / "small.bin", [[1, 2], [3]])
    write_bin(root / "nometa.bin", [[1, 2], [VOCAB + 9]], meta=False)
    return bad


def test_workers_and_the_cache_give_the_same_report(tmp_path, tiny_model):
    bad = _mixed_corpus(tmp_path / "d", seed=3)
    reports = []
    for workers, cache in ((1, "c1"), (2, "c2"), (2, "c2")):
        r = tt("data", "check", tmp_path / "d", "--model", tiny_model, "--workers", workers, cache=tmp_path / cache)
        assert r.returncode == 1, r.stderr
        stored = 3 if (workers, cache) == (2, "c2") and reports[1:] else 0
        assert f"({stored} unchanged since summarised" in r.stderr
        reports.append(r.stdout)
    assert reports[0] == reports[1] == reports[2]
    out = reports[0].splitlines()
    big, nometa = tmp_path / "d" / "big.bin", tmp_path / "d" / "nometa.bin"
    assert [ln.split(" (byte")[0] for ln in out if "2.5" in ln] == [f"{big}: line {n}" for n in bad]
    assert any(ln.startswith(f"{big}: ") and f"token id {VOCAB + 7}" in ln for ln in out)
    assert f"{nometa}: no meta file nometa.bin.meta; build it with `tokentrain data index`" in out
    assert any(ln.startswith(f"{nometa}: line 2 (byte {len(line_bytes([1, 2]))}): token id {VOCAB + 9}") for ln in out)


def test_a_changed_file_is_read_again(tmp_path, tiny_model):
    d = tmp_path / "d"
    write_bin(d / "a.bin", [[1, 2], [3]])
    assert tt("data", "check", d, "--model", tiny_model, cache=tmp_path / "c").returncode == 0
    m = write_bin(d / "a.bin", [[1, 2], [3], [VOCAB + 5]])  # same path, new content and meta
    r = tt("data", "check", d, "--model", tiny_model, cache=tmp_path / "c")
    assert r.returncode == 1 and r.stdout.startswith(
        f"{d / 'a.bin'}: line 3 (byte {int(m[2, 0])}): token id {VOCAB + 5}"
    )
    assert "(0 unchanged since summarised" in r.stderr


def test_train_refuses_ids_over_the_vocabulary_before_the_model(tmp_path, tiny_model):
    data = tmp_path / "d"
    write_bin(data / "a.bin", [[1, 2, 3]] * 300, meta=False)  # train builds the meta: and the summary with it
    mb = write_bin(data / "b.bin", [[4, 5]] * 50 + [[6, VOCAB + 40]], meta=False)
    cfg = write_config(
        tmp_path / "cfg.py", pretrained_model_name_or_path=str(tiny_model), dataset_folder=str(data), max_length=16
    )
    r = tt("train", cfg, "--work-dir", tmp_path / "w", cache=tmp_path / "cache")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith(
        f"{data / 'b.bin'}: line 51 (byte {int(mb[50, 0])}): token id {VOCAB + 40} >= the vocabulary size {VOCAB} "
        f"of {tiny_model}; tokenize the data with this model's tokenizer, or train a model whose vocabulary holds "
        "it (`tokentrain data check --config CFG` lists every such file)"
    )
    assert " data: " in r.stderr  # the data was set up ...
    assert " engine: " not in r.stderr and " model: " not in r.stderr  # ... neither the engine nor the model


def test_train_without_summaries_says_so_and_reads_nothing_at_start(tmp_path, tiny_model, tiny_data):
    """Metas written by another tool: no summary, so nothing is read ahead; the log says how to get one."""
    cache = tmp_path / "cache"
    cfg = write_config(
        tmp_path / "cfg.py",
        pretrained_model_name_or_path=str(tiny_model),
        dataset_folder=str(tiny_data),
        max_length=16,
        max_iters=1,
        batch_size=1,
        save_steps=1000,
        evaluation_inputs=[],
        tensorboard=False,
        dtype="float32",
    )
    r = tt("train", cfg, "--work-dir", tmp_path / "w", cache=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "token ids: 2 of 2 data file(s) not yet summarised" in r.stderr
    assert " engine: " in r.stderr and " model: " in r.stderr  # what the refusal above never reaches
    assert not (cache / "summary").exists()
    assert tt("data", "check", "--config", cfg, cache=cache).returncode == 0
    r = tt("train", cfg, "--work-dir", tmp_path / "w2", cache=cache)
    assert r.returncode == 0 and f"token ids: every data file's largest id is < the vocabulary size {VOCAB}" in r.stderr


def test_config_with_a_mixture_checks_every_source(tmp_path, tiny_model):
    write_bin(tmp_path / "s1" / "a.bin", [[1, 2], [3, 4]])
    m = write_bin(tmp_path / "s2" / "b.bin", [[5, 6], [7, VOCAB + 2]])
    cfg = write_config(
        tmp_path / "cfg.py",
        pretrained_model_name_or_path=str(tiny_model),
        dataset_folder=None,
        datasets=[dict(folder=str(tmp_path / "s1")), dict(folder=str(tmp_path / "s2"), weight=2.0, name="two")],
    )
    r = tt("data", "check", "--config", cfg, cache=tmp_path / "cache")
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 's2' / 'b.bin'}: line 2 (byte {int(m[1, 0])}): token id {VOCAB + 2} ")
    assert "checked 2 file(s)" in r.stderr
