"""Per-sample randomness and the batch sampler: splits differ, seeds matter, batches resume and split over ranks."""
import itertools

import numpy as np
import pytest
import torch

from attnlab.tasks.copy import CopyDataset
from attnlab.tasks.sampling import BatchSampler


def samples(split, seed, n=200):
    ds = CopyDataset(n, 1, 32, 10, seed, split)
    return [tuple(ds[i].tolist()) for i in range(n)]


def test_copy_splits_differ_and_the_seed_changes_the_data():
    # Failed before: the CPU generator kept only the low bits of (seed, split, i), so sample i was the same everywhere.
    train, val, test = samples("train", 1234), samples("val", 1234), samples("test", 1234)
    assert CopyDataset(4, 1, 32, 10, 1234, "val")[0].tolist() != CopyDataset(4, 1, 32, 10, 1234, "test")[0].tolist()
    for a, b in [(train, val), (train, test), (val, test)]:
        same = sum(x == y for x, y in zip(a, b))
        assert same <= 5, same  # chance level: only a few length-1/2 samples can coincide
        assert len(set(a) & set(b)) <= 10
    other = samples("train", 4321)
    assert sum(x == y for x, y in zip(train, other)) <= 5
    assert samples("train", 1234) == train  # and it is deterministic


def consume(sampler, n):
    return [list(b) for b in itertools.islice(iter(sampler), n)]


@pytest.mark.parametrize("batching", [{"batch_size": 3}, {"max_tokens": 20}])
def test_resume_at_any_position_continues_the_same_batches_across_epochs(batching):
    lengths = np.random.default_rng(0).integers(1, 8, 50)
    kw = dict(lengths=lengths, shuffle=True, seed=5, **batching)
    ref = BatchSampler(50, **kw)
    nb = ref.batches_per_epoch()
    stream = []
    while len(stream) < 3 * nb + 2:  # several epochs, as Lightning iterates them
        stream += consume(ref, nb)
    assert stream[:nb] != stream[nb:2 * nb]  # each epoch is reshuffled
    for start in [0, 1, nb - 1, nb, 2 * nb + 3]:
        resumed = BatchSampler(50, start_batch=start, **kw)
        got = []
        while len(got) < len(stream) - start:
            got += consume(resumed, nb)
        assert got[:len(stream) - start] == stream[start:], start


def test_ranks_split_each_global_batch_like_one_bigger_batch():
    one = BatchSampler(40, batch_size=8, shuffle=True, seed=3)
    ranks = [BatchSampler(40, batch_size=4, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for b1, b_r0, b_r1 in zip(iter(one), iter(ranks[0]), iter(ranks[1])):
        assert sorted(b1) == sorted(b_r0 + b_r1) and not set(b_r0) & set(b_r1)


def test_max_tokens_bounds_padded_size_and_eval_sees_every_sample_once():
    lengths = np.random.default_rng(1).integers(1, 30, 101)
    for world in (1, 2, 3):
        seen = []
        for r in range(world):
            s = BatchSampler(101, max_tokens=64, lengths=lengths, shuffle=False, drop_last=False, rank=r,
                             world_size=world)
            for b in s:
                assert len(b) * lengths[b].max() <= 64
                seen += b
        assert sorted(seen) == list(range(101))
    with pytest.raises(ValueError, match="max_tokens"):
        BatchSampler(3, max_tokens=4, lengths=[1, 9, 2])


def test_too_little_data_for_one_batch_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="Fix: a smaller batch"):
        BatchSampler(5, batch_size=4, world_size=2)
