"""The copy task of "Transformers are RNNs" (Katharopoulos et al., 2020, Fig. 2).

A sample is ``x SEP x``: a random sequence over ``n_symbols`` symbols, a separator, then the same sequence.
The model is a causal language model over it; loss and per-symbol accuracy are measured on the copied half
only (the first half is random and cannot be predicted).

Token ids: 0 = padding, 1 = separator, 2 .. n_symbols+1 = symbols. Sample ``i`` of a split is generated from
its own seed ``(seed, split, i)``, so the data are the same for any batch size, worker count or resume point.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

PAD, SEP = 0, 1
_SPLIT_OFFSET = {"train": 0, "val": 1 << 40, "test": 2 << 40}


class CopyDataset(Dataset):
    def __init__(self, size: int, min_len: int, max_len: int, n_symbols: int, seed: int, split: str):
        self.size, self.min_len, self.max_len, self.n_symbols = size, min_len, max_len, n_symbols
        self.base = seed * (3 << 42) + _SPLIT_OFFSET[split]

    def __len__(self):
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.base + i)
        n = int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=g))
        x = torch.randint(2, 2 + self.n_symbols, (n,), generator=g)
        return torch.cat([x, torch.tensor([SEP]), x])


def collate(samples: list[torch.Tensor]) -> dict:
    """Right-pad to the longest sample; next-token targets with -100 (ignored) outside the copied half."""
    T = max(len(s) for s in samples) - 1
    inputs = torch.full((len(samples), T), PAD, dtype=torch.long)
    targets = torch.full((len(samples), T), -100, dtype=torch.long)
    for b, s in enumerate(samples):
        n = (len(s) - 1) // 2
        inputs[b, : len(s) - 1] = s[:-1]
        targets[b, n: len(s) - 1] = s[n + 1:]  # position n holds SEP and predicts the first copied symbol
    return {"inputs": inputs, "targets": targets}


class _FromStep(torch.utils.data.Sampler):
    """Sequential indices starting at ``start``: a resumed run continues exactly where the checkpoint left off."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self):
        return max(self.end - self.start, 0)


class CopyDataModule(pl.LightningDataModule):
    def __init__(self, n_symbols: int = 10, min_len: int = 1, max_len: int = 32, batch_size: int = 64,
                 train_size: int = 1_000_000, val_size: int = 1024, test_size: int = 1024, seed: int = 0,
                 num_workers: int = 0):
        super().__init__()
        if not 1 <= min_len <= max_len:
            raise ValueError(f"copy task needs 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        self.save_hyperparameters()
        self.vocab_size = n_symbols + 2
        self.max_len = 2 * max_len  # model input length: x SEP x minus the last token

    def _dataset(self, split: str, size: int) -> CopyDataset:
        h = self.hparams
        return CopyDataset(size, h.min_len, h.max_len, h.n_symbols, h.seed, split)

    def train_dataloader(self):
        h = self.hparams
        start = 0
        if self.trainer is not None:  # resume: skip the samples the restored steps already consumed
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches * h.batch_size
        return DataLoader(self._dataset("train", h.train_size), batch_size=h.batch_size,
                          sampler=_FromStep(start, h.train_size), collate_fn=collate, num_workers=h.num_workers)

    def val_dataloader(self):
        return DataLoader(self._dataset("val", self.hparams.val_size), batch_size=self.hparams.batch_size,
                          collate_fn=collate, num_workers=self.hparams.num_workers)

    def test_dataloader(self):
        return DataLoader(self._dataset("test", self.hparams.test_size), batch_size=self.hparams.batch_size,
                          collate_fn=collate, num_workers=self.hparams.num_workers)
