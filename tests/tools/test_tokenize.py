"""`tokentrain tokenize`: round trip, sign masking, determinism, sharding, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tokentrain.cli.main import main
from tokentrain.data import format as fmt
from tokentrain.data.corpus_check import all_problems, summarize
from tokentrain.errors import DataError
from tokentrain.tools.tokenize import TokenizeOptions, tokenize_files

ROOT = Path(__file__).resolve().parents[2]
TOK = str(ROOT / "demo" / "tiny-llama")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOK)


def read_docs(folder: Path) -> list[np.ndarray]:
    docs = []
    for p in fmt.discover_files(folder):
        for line in p.read_bytes().splitlines():
            docs.append(np.asarray(json.loads(line)["tokens"]))
    return docs


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And the capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


def test_chat_round_trips_and_only_assistant_replies_are_targets(tmp_path, tok):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    tokenize_files([src], TokenizeOptions(TOK, str(tmp_path / "out"), progress=False))
    (doc,) = read_docs(tmp_path / "out")
    assert tok.decode(np.abs(doc), skip_special_tokens=False) == tok.apply_chat_template(CONV, tokenize=False)
    # The positive tokens, run by run, are exactly each reply plus its end marker.
    runs, cur = [], []
    for t in doc.tolist() + [-1]:
        if t > 0:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    assert runs == ["2 plus 3 is 5.<|im_end|>\n", "Lima.<|im_end|>\n"]
    files = fmt.discover_files(tmp_path / "out")
    assert all_problems(files, summarize(files)[0]) == []


def test_train_roles_and_named_template(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}])
    opts = TokenizeOptions(TOK, str(tmp_path / "o"), train_roles=("user",), chat_template="chatml", progress=False)
    tokenize_files([src], opts)
    (doc,) = read_docs(tmp_path / "o")
    text = tok.decode(np.abs(doc), skip_special_tokens=False)
    assert not text.startswith("<s>")  # chatml has no BOS, unlike the tokenizer's own template
    positive = tok.decode(doc[doc > 0], skip_special_tokens=False)
    assert positive == "What is 2 plus 3?<|im_end|>\nAnd the capital of Peru?<|im_end|>\n"


def test_text_formats_add_bos_and_eos_all_positive(tmp_path, tok):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n\nthird para\nstill third\n")
    js = write_jsonl(tmp_path / "b.jsonl", [{"text": "hello world"}])
    tokenize_files([txt, js], TokenizeOptions(TOK, str(tmp_path / "o1"), progress=False))
    docs = read_docs(tmp_path / "o1")
    assert [tok.decode(d[1:-1]) for d in docs] == [
        "first line",
        "second line",
        "third para",
        "still third",
        "hello world",
    ]
    assert all(d[0] == tok.bos_token_id and d[-1] == tok.eos_token_id and (d > 0).all() for d in docs)
    tokenize_files(
        [txt], TokenizeOptions(TOK, str(tmp_path / "o2"), txt_mode="paragraph", add_bos=False, progress=False)
    )
    docs = read_docs(tmp_path / "o2")
    assert [tok.decode(d[:-1]) for d in docs] == ["first line\nsecond line", "third para\nstill third"]


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a + b}."},
            ]
        }
        for a in range(10)
        for b in range(10)
    ]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    outs = []
    for i, workers in enumerate((1, 2, 2)):
        out = tmp_path / f"o{i}"
        tokenize_files([src], TokenizeOptions(TOK, str(out), workers=workers, shard_bytes=2000, progress=False))
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] == outs[2]
    assert len([n for n in outs[0] if n.endswith(".bin")]) > 1  # the size limit made several shards
    assert all(len(b) <= 2000 for n, b in outs[0].items() if n.endswith(".bin"))
    assert len(read_docs(tmp_path / "o0")) == 100


@pytest.mark.parametrize(
    "line, why",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"msgs": []}), 'missing "messages" field'),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "unknown role 'wizard'"),
        (json.dumps({"messages": []}), "non-empty list"),
        (json.dumps({"messages": [{"role": "user"}]}), '"role" and "content"'),
    ],
)
def test_bad_chat_records_name_file_and_line_and_leave_nothing(tmp_path, line, why):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": CONV}) + "\n" + line + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"c\.jsonl: line 2: .*{why}"):
        tokenize_files([src], TokenizeOptions(TOK, str(out), progress=False))
    assert list(out.iterdir()) == []  # no shard, partial or not
    s = tokenize_files([src], TokenizeOptions(TOK, str(out), skip_bad=True, progress=False))
    assert (s.documents, s.skipped) == (1, 1)


def test_empty_text_document(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": "   "}])
    with pytest.raises(DataError, match=r"t\.jsonl: line 2: empty document"):
        tokenize_files([src], TokenizeOptions(TOK, str(tmp_path / "o"), progress=False))


def test_cli_exit_codes_and_summary(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}] * 3)
    out = tmp_path / "o"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrain",
            "tokenize",
            str(src),
            "--tokenizer",
            TOK,
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "tokenized 3 documents" in r.stdout and "tokens/s" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrain",
            "tokenize",
            str(bad),
            "--format",
            "chat",
            "--tokenizer",
            TOK,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3 and "bad.jsonl: line 1: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    assert main(["tokenize", str(src), "--tokenizer", str(tmp_path / "nope"), "--out", str(out), "--workers", "1"]) == 2
