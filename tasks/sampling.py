"""Randomness per sample and batches per step, the same for every task.

``sample_rng(seed, split, index)``: the random stream of one generated sample. numpy's SeedSequence hashes the whole
tuple (no bits dropped), so every (seed, split, index) gets its own stream: splits never share samples and the seed
changes the data. (``torch.Generator.manual_seed(seed * 2**42 + split * 2**40 + i)`` did not: the high bits were lost
and sample i of train, val and test were the same for every seed.)

``BatchSampler``: the batches of one rank, a pure function of (seed, epoch, position), so a run resumed at any optimizer
step continues with exactly the batches the uninterrupted run would have seen, over any number of epochs:

- fixed size (``batch_size``): the epoch's order (a seeded permutation, or 0..n-1) is cut into global batches of
  ``batch_size * world_size`` samples; rank r takes the r-th slice. One process with batch size B*W and W processes
  with B each see the same samples at every step.
- by tokens (``max_tokens``, fairseq's semantics): samples sorted by length (ties broken by the epoch's permutation),
  cut greedily into batches whose padded size ``len(batch) * longest`` stays <= max_tokens; batch order shuffled per
  epoch; rank r takes batches r, r+W, ... A sample longer than max_tokens is an error (never truncated).

Training batches (``drop_last=True``) drop the ragged end of an epoch so that every rank takes the same number of
steps, and the sampler remembers its position; evaluation batches (``drop_last=False``) keep every sample, each exactly
once across ranks, from the start at every pass.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent random stream for sample ``index`` of ``split`` under ``seed``."""
    return np.random.default_rng([int(seed) & (2**63 - 1), SPLITS[split], int(index)])


class BatchSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, batch_size: int | None = None, max_tokens: int | None = None, lengths=None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give exactly one of batch_size and max_tokens (task.batch_size / task.max_tokens)")
        if max_tokens is not None and lengths is None:
            raise ValueError("max_tokens batching needs the sample lengths")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.max_tokens = n, batch_size, max_tokens
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        if self.max_tokens is not None and len(self.lengths) and self.lengths.max() > max_tokens:
            i = int(self.lengths.argmax())
            raise ValueError(f"sample {i} has {self.lengths[i]} tokens, more than max_tokens={max_tokens}. Fix: raise "
                             f"`task.max_tokens` or filter long samples (`task.max_source_positions`/"
                             f"`max_target_positions`); nothing is truncated.")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.pos = start_batch  # batches of this rank handed out since step 0 (all epochs); training only
        self._epoch_cache: tuple[int, list] | None = None
        if drop_last and self.batches_per_epoch() == 0:
            raise ValueError(f"{n} samples make no batch of {self._unit()} on {world_size} process(es). Fix: a "
                             f"smaller batch (`task.batch_size` / `task.max_tokens`) or more data.")

    def _unit(self) -> str:
        return f"batch_size={self.batch_size}" if self.batch_size else f"max_tokens={self.max_tokens}"

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([int(self.seed) & (2**63 - 1), 7, epoch]).permutation(self.n)

    def _rank_batches(self, epoch: int) -> list:
        """This rank's batches of one epoch (lists of sample indices)."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        order, W, r = self._order(epoch), self.world_size, self.rank
        if self.batch_size is not None:
            g = self.batch_size * W
            n_full = len(order) // g
            n_steps = n_full if self.drop_last or len(order) % g == 0 else n_full + 1
            out = []
            for s in range(n_steps):
                chunk = order[s * g:(s + 1) * g]
                part = np.array_split(chunk, W)[r] if len(chunk) < g else chunk[r * self.batch_size:(r + 1) * self.batch_size]
                if len(part):
                    out.append(part.tolist())
        else:
            by_len = order[np.argsort(self.lengths[order], kind="stable")]
            batches, cur, longest = [], [], 0
            for i in by_len.tolist():
                longest_new = max(longest, int(self.lengths[i]))
                if cur and longest_new * (len(cur) + 1) > self.max_tokens:
                    batches.append(cur)
                    cur, longest_new = [], int(self.lengths[i])
                cur.append(i)
                longest = longest_new
            if cur:
                batches.append(cur)
            if self.shuffle:
                perm = np.random.default_rng([int(self.seed) & (2**63 - 1), 8, epoch]).permutation(len(batches))
                batches = [batches[j] for j in perm]
            n_steps = len(batches) // W if self.drop_last else -(-len(batches) // W)
            out = [batches[s * W + r] for s in range(n_steps) if s * W + r < len(batches)]
        self._epoch_cache = (epoch, out)
        return out

    def batches_per_epoch(self) -> int:
        return len(self._rank_batches(0))

    def __len__(self) -> int:
        """Batches left in the current epoch (Lightning reads this at the start of each epoch)."""
        if not self.drop_last:
            return self.batches_per_epoch()
        return self.batches_per_epoch() - self.pos % self.batches_per_epoch()

    def __iter__(self):
        if not self.drop_last:  # evaluation: the whole set, every time
            yield from self._rank_batches(0)
            return
        nb = self.batches_per_epoch()
        epoch, offset = divmod(self.pos, nb)
        for b in self._rank_batches(epoch)[offset:]:
            self.pos += 1
            yield b


def dist_info(trainer) -> tuple[int, int]:
    """(rank, world size) of a Lightning trainer, (0, 1) without one."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def train_loader(dataset, collate_fn, trainer, seed: int, num_workers: int = 0, **batching) -> DataLoader:
    """The training DataLoader: resumes at the trainer's step (``global_step * accumulate_grad_batches`` batches of
    this rank already consumed). ``batching``: batch_size= or max_tokens= (+ lengths=), shuffle=."""
    rank, world = dist_info(trainer)
    start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
    sampler = BatchSampler(len(dataset), seed=seed, rank=rank, world_size=world, start_batch=start, drop_last=True,
                           **batching)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)


def eval_loader(dataset, collate_fn, trainer, num_workers: int = 0, **batching) -> DataLoader:
    """Validation/test DataLoader: every sample once across ranks, in a fixed order."""
    rank, world = dist_info(trainer)
    sampler = BatchSampler(len(dataset), shuffle=False, drop_last=False, rank=rank, world_size=world, **batching)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)
