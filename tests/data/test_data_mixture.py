"""Weighted mixtures: shares, determinism, split invariance and exact resume of the stream,
on real packed datasets read through the real StepStream (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest

from tokentrain.config.schema import TrainConfig
from tokentrain.data.dataset import build_train_data, log_mixture_plan, planned_counts
from tokentrain.data.mixture import parse_sources
from tokentrain.errors import DataError
from tokentrain.training.data_stream import StepStream

from .helpers import write_bin

L = 32
WEIGHTS = {"web": 0.6, "code": 0.3, "books": 0.1}
BASE = {"web": 1000, "code": 2000, "books": 3000}  # each source's tokens live in its own id range


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(5)
    out = {}
    for name, base in BASE.items():
        docs = [base + rng.integers(1, 999, int(rng.integers(5, 40))) for _ in range(300)]
        write_bin(tmp_path / name / "part.bin", docs)
        out[name] = tmp_path / name
    return out


def _cfg(sources, **over) -> TrainConfig:
    ds = [dict(folder=str(sources[n]), weight=w, name=n) for n, w in WEIGHTS.items()]
    return TrainConfig(datasets=ds, max_length=L, seed=11, **over)


def _source_of(ids: np.ndarray) -> np.ndarray:
    return (ids // 1000).astype(np.int64)  # 1 web, 2 code, 3 books


def test_three_sources_give_their_weights_within_one_percent_over_1000_packs(sources):
    mix, _ = build_train_data(_cfg(sources))
    tokens = np.zeros(4, dtype=np.int64)
    for i in range(1000):
        s = mix[i]
        assert len(set(_source_of(s["input_ids"]).tolist())) == 1  # a pack never mixes sources
        assert _source_of(s["input_ids"][:1])[0] == list(BASE).index(s["source"]) + 1
        tokens += np.bincount(_source_of(s["input_ids"]), minlength=4)
    share = tokens[1:] / tokens.sum()
    assert np.abs(share - np.array(list(WEIGHTS.values()))).max() < 0.01, share
    # and in every window of 100 packs too (the interleave is even, not bursts)
    starts = [list(BASE).index(mix[i]["source"]) for i in range(2000, 2100)]
    assert abs(starts.count(0) - 60) <= 2 and abs(starts.count(2) - 10) <= 2


def test_documents_stay_isolated_inside_a_mixed_pack(sources):
    mix, _ = build_train_data(_cfg(sources))
    for i in range(50):
        s = mix[i]
        cu = s["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == len(s["input_ids"]) == L
        for a, b in zip(cu, cu[1:]):
            assert s["position_ids"][a:b].tolist() == list(range(b - a))


def _positions(cfg, world: int, batch: int, acc: int, steps: int) -> list[list[int]]:
    """The global batch (sorted mixture positions) of each step, read through every rank's StepStream."""
    per_rank = []
    for r in range(world):
        ds, sampler = build_train_data(cfg, r, world)
        stream = iter(StepStream(ds, sampler, batch, acc, 0))
        per_rank.append([[k for m in next(stream) for k in m.batch.indices] for _ in range(steps)])
    return [sorted(k for r in range(world) for k in per_rank[r][t]) for t in range(steps)]


def test_same_seed_same_stream_for_any_split_of_ranks_and_accumulation(sources):
    cfg = _cfg(sources)
    ref = _positions(cfg, 1, 8, 1, 6)
    for world, batch, acc in [(2, 2, 2), (4, 1, 2), (8, 1, 1), (2, 4, 1)]:
        assert _positions(cfg, world, batch, acc, 6) == ref, (world, batch, acc)
    a, _ = build_train_data(cfg)
    b, _ = build_train_data(_cfg(sources))
    c, _ = build_train_data(_cfg(sources).replace(seed=12))
    seq = [(a[i]["source"], a[i]["input_ids"].tolist()) for i in range(200)]
    assert seq == [(b[i]["source"], b[i]["input_ids"].tolist()) for i in range(200)]
    assert seq != [(c[i]["source"], c[i]["input_ids"].tolist()) for i in range(200)]


def test_stream_resumes_exactly_and_crosses_mixture_epochs(sources):
    cfg = _cfg(sources)
    ds, sampler = build_train_data(cfg, 0, 2)
    stream = StepStream(ds, sampler, 4, 1, 0)
    spe = stream.steps_per_epoch
    it = iter(stream)
    seen = []
    for _ in range(spe + 3):  # into the second mixture epoch
        seen.append(next(it)[0].batch.indices)
        sampler.advance(stream.samples_per_step)
    state = sampler.state_dict()
    after = [next(it)[0].batch.indices for _ in range(3)]
    ds2, sampler2 = build_train_data(cfg, 0, 2)
    sampler2.load_state_dict(state)
    it2 = iter(StepStream(ds2, sampler2, 4, 1, 0))
    assert [next(it2)[0].batch.indices for _ in range(3)] == after
    assert seen[spe][0] >= len(ds)  # epoch 2 continues the stream, it does not replay epoch 1
    flat = [k for ks in seen for k in ks]
    assert len(flat) == len(set(flat))


def test_a_checkpoint_of_another_mixture_is_refused(sources):
    _, sampler = build_train_data(_cfg(sources))
    other = _cfg(sources)
    other.datasets[0]["weight"] = 0.5
    _, sampler2 = build_train_data(other)
    with pytest.raises(DataError, match="weights changed"):
        sampler2.load_state_dict(sampler.state_dict())


def test_batch_carries_real_tokens_per_source(sources):
    ds, sampler = build_train_data(_cfg(sources))
    (micro,) = next(iter(StepStream(ds, sampler, 8, 1, 0)))
    batch, real = micro.batch, micro.real_tokens
    assert sum(batch.source_tokens.values()) == real == 8 * L
    expect = {}
    for k in batch.indices:
        expect[ds[k]["source"]] = expect.get(ds[k]["source"], 0) + L
    assert batch.source_tokens == expect


def test_over_sampled_source_is_said_in_the_start_up_log(sources, info_logs):
    mix, _ = build_train_data(_cfg(sources))
    rows = log_mixture_plan(mix, planned_counts(mix, total_steps=100, steps_per_epoch=10**6, global_batch=8))
    web = next(r for r in rows if r["name"] == "web")
    assert web["planned_samples"] == 480 and web["epochs"] == pytest.approx(480 / web["samples"])
    assert web["epochs"] > 1 and "mixture source web" in info_logs.text and "over-sampled" in info_logs.text
    books = next(r for r in rows if r["name"] == "books")
    assert books["epochs"] < 1


@pytest.mark.parametrize(
    "entries, msg",
    [
        ([], "non-empty list"),
        ([dict(weight=1)], "'folder'"),
        ([dict(folder="a", weight=0)], "must be a finite number > 0"),
        ([dict(folder="a", wieght=1)], "unknown key 'wieght'"),
        ([dict(folder="x/a"), dict(folder="y/a")], "name 'a' used twice"),
        ([dict(folder="a", weight=1e-6), dict(folder="b", weight=1)], "gets no sample"),
    ],
)
def test_bad_mixture_entries_are_named(entries, msg):
    with pytest.raises(ValueError, match=msg):
        parse_sources(entries)


def test_planned_counts_are_what_the_stream_reads_across_mixture_epochs(sources):
    cfg = _cfg(sources)
    ds, sampler = build_train_data(cfg)
    stream = StepStream(ds, sampler, 8, 1, 0)
    spe, it = stream.steps_per_epoch, iter(stream)
    steps = 2 * spe + 5
    read = np.zeros(3, dtype=np.int64)
    for _ in range(steps):
        (micro,) = next(it)
        batch = micro.batch
        sampler.advance(8)
        for k in batch.indices:
            read[list(BASE).index(ds[k]["source"])] += 1
    assert planned_counts(ds, steps, spe, 8).tolist() == read.tolist()


def test_mixture_pickles_for_spawned_dataloader_workers(sources):
    import pickle

    mix, _ = build_train_data(_cfg(sources))
    copy = pickle.loads(pickle.dumps(mix))
    assert all(copy[i]["input_ids"].tolist() == mix[i]["input_ids"].tolist() for i in (0, 5, 9999, 10000, 12345))
