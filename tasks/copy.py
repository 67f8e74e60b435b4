"""The copy task of "Transformers are RNNs" (Katharopoulos et al., 2020, Fig. 2).

A sample is ``x SEP x``: a random sequence over ``n_symbols`` symbols, a separator, then the same sequence.
The model is a causal language model over it; loss and per-symbol accuracy are measured on the copied half
only (the first half is random and cannot be predicted).

Token ids: 0 = padding, 1 = separator, 2 .. n_symbols+1 = symbols. Sample ``i`` of a split is generated from its own
random stream ``sample_rng(seed, split, i)``, so the data are the same for any batch size, worker count, number of
processes or resume point, differ between splits, and change with the seed.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from .sampling import eval_loader, sample_rng, train_loader

PAD, SEP = 0, 1


class CopyDataset(Dataset):
    def __init__(self, size: int, min_len: int, max_len: int, n_symbols: int, seed: int, split: str):
        self.size, self.min_len, self.max_len, self.n_symbols = size, min_len, max_len, n_symbols
        self.seed, self.split = seed, split

    def __len__(self):
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = sample_rng(self.seed, self.split, i)
        n = int(rng.integers(self.min_len, self.max_len + 1))
        x = torch.from_numpy(rng.integers(2, 2 + self.n_symbols, n))
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


class CopyDataModule(pl.LightningDataModule):
    batch_kind = "lm"

    def __init__(self, n_symbols: int = 10, min_len: int = 1, max_len: int = 32, batch_size: int = 64,
                 train_size: int = 1_000_000, val_size: int = 1024, test_size: int = 1024, seed: int = 0,
                 num_workers: int = 0):
        super().__init__()
        if not 1 <= min_len <= max_len:
            raise ValueError(f"copy task needs 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        self.save_hyperparameters()

    def net_args(self) -> dict:
        """What the network needs from the data: the input length is x SEP x minus the last token."""
        return {"vocab_size": self.hparams.n_symbols + 2, "max_len": 2 * self.hparams.max_len}

    def _dataset(self, split: str, size: int) -> CopyDataset:
        h = self.hparams
        return CopyDataset(size, h.min_len, h.max_len, h.n_symbols, h.seed, split)

    def train_dataloader(self):
        h = self.hparams
        # A sequential stream (shuffle=False): the samples are random already; resumes at the trainer's step.
        return train_loader(self._dataset("train", h.train_size), collate, self.trainer, h.seed, h.num_workers,
                            batch_size=h.batch_size, shuffle=False)

    def val_dataloader(self):
        h = self.hparams
        return eval_loader(self._dataset("val", h.val_size), collate, self.trainer, h.num_workers,
                           batch_size=h.batch_size)

    def test_dataloader(self):
        h = self.hparams
        return eval_loader(self._dataset("test", h.test_size), collate, self.trainer, h.num_workers,
                           batch_size=h.batch_size)
