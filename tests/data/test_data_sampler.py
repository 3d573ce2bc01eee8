"""data/sampler.py: per-epoch seeded order, data-parallel split, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrain.data.sampler import ResumableSampler
from tokentrain.errors import DataError


def _epoch(n, world, epoch=0, seed=0, shuffle=True):
    out = []
    for r in range(world):
        s = ResumableSampler(n, r, world, seed, shuffle)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 300),
    world=st.integers(1, 9),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 9),
    shuffle=st.booleans(),
)
def test_ranks_partition_each_epoch(n, world, epoch, seed, shuffle):
    if n < world:
        with pytest.raises(DataError, match=f"only {n} samples for {world} data-parallel ranks"):
            ResumableSampler(n, 0, world)
        return
    per_rank = _epoch(n, world, epoch, seed, shuffle)
    flat = [i for ids in per_rank for i in ids]
    assert all(len(ids) == n // world for ids in per_rank)  # equal shares
    assert len(flat) == len(set(flat)) == (n // world) * world  # every sample to at most one rank ...
    assert set(flat) <= set(range(n))  # ... and at most world-1 left out of an epoch
    if shuffle is False:
        assert sorted(flat) == list(range((n // world) * world))


def _global_batches(n, world, micro, accum, epoch, seed, steps):
    """The samples of each optimizer step, as a set, for a given split."""
    ranks = [ResumableSampler(n, r, world, seed) for r in range(world)]
    orders = []
    for s in ranks:
        s.set_epoch(epoch)
        orders.append(list(s))
    per_step = micro * accum
    return [sorted(i for o in orders for i in o[k * per_step : (k + 1) * per_step]) for k in range(steps)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(48, 400), epoch=st.integers(0, 3), seed=st.integers(0, 5))
def test_global_batch_independent_of_world_size_and_micro_batches(n, epoch, seed):
    # global batch 24 = world x micro x accumulation, split six ways
    splits = [(1, 24, 1), (2, 12, 1), (4, 3, 2), (8, 3, 1), (3, 2, 4), (6, 1, 4)]
    steps = n // 24 - 1  # full global batches common to every split (the epoch is trimmed per world)
    results = [_global_batches(n, w, m, a, epoch, seed, steps) for w, m, a in splits]
    for r in results[1:]:
        assert r == results[0]
    assert all(len(b) == 24 for b in results[0])


def test_epochs_differ_and_are_reproducible():
    a = _epoch(1000, 4, epoch=0, seed=7)
    assert a == _epoch(1000, 4, epoch=0, seed=7)
    assert a != _epoch(1000, 4, epoch=1, seed=7)
    assert a != _epoch(1000, 4, epoch=0, seed=8)
    assert a[0][:50] != list(range(0, 200, 4))  # shuffled
    assert _epoch(10, 2, shuffle=False) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert _epoch(10, 2, epoch=3, shuffle=False) == _epoch(10, 2, shuffle=False)


def test_len_and_bad_rank():
    assert len(ResumableSampler(10, 1, 3)) == 3
    with pytest.raises(ValueError):
        ResumableSampler(10, 3, 3)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(4, 200), world=st.integers(1, 4), epoch=st.integers(0, 3), data=st.data())
def test_resume_mid_epoch_continues_exactly(n, world, epoch, data):
    rank = data.draw(st.integers(0, world - 1))
    s = ResumableSampler(n, rank, world, seed=11)
    s.set_epoch(epoch)
    full = list(s)
    k = data.draw(st.integers(0, len(full)))
    it = iter(s)
    consumed = [next(it) for _ in range(k)]
    s.advance(k)
    state = s.state_dict()
    fresh = ResumableSampler(n, rank, world, seed=11)
    fresh.load_state_dict(state)
    fresh.set_epoch(epoch)  # the trainer calls this again on resume: it must not rewind
    assert consumed + list(fresh) == full
    fresh.set_epoch(epoch + 1)  # next epoch starts from its beginning
    assert list(fresh) == _epoch(n, world, epoch + 1, seed=11)[rank]


def test_advance_counts_only_consumed_samples():
    s = ResumableSampler(20, seed=1)
    ids = list(s)
    it = iter(s)
    [next(it) for _ in range(8)]  # prefetched ahead by workers
    s.advance(5)  # really consumed
    resumed = ResumableSampler(20, seed=1)
    resumed.load_state_dict(s.state_dict())
    assert list(resumed) == ids[5:]


def test_resume_on_a_different_world_size():
    n, seed = 96, 3
    old = [ResumableSampler(n, r, 4, seed) for r in range(4)]
    for s in old:
        s.advance(6)  # 24 samples consumed globally
    done = sorted(i for s in old for i in s.order(0)[:6])
    new = [ResumableSampler(n, r, 2, seed) for r in range(2)]
    for s in new:
        s.load_state_dict(old[0].state_dict())
    rest = sorted(i for s in new for i in s)
    assert sorted(done + rest) == list(range(n)) and not set(done) & set(rest)
    odd = ResumableSampler(n, 0, 5, seed)
    with pytest.raises(DataError, match="cannot resume position 24 on 5 ranks"):
        odd.load_state_dict(old[0].state_dict())


def test_resume_with_changed_data_is_refused():
    s = ResumableSampler(100, seed=1)
    s.advance(3)
    with pytest.raises(DataError, match="data or its settings changed"):
        ResumableSampler(101, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match="data or its settings changed"):
        ResumableSampler(100, seed=2).load_state_dict(s.state_dict())


def test_order_is_numpy_ints_of_this_rank():
    s = ResumableSampler(17, 2, 4, seed=0)
    o = s.order(0)
    assert isinstance(o, np.ndarray) and len(o) == 4 and all(type(i) is int for i in s)
