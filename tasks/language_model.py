"""Language modelling over a text corpus (WikiText-style): contiguous blocks of ``tokens_per_sample`` tokens.

``data_dir`` holds a monolingual fairseq data-bin (``dict.txt``, ``{train,valid,test}.bin/.idx``; e.g.
``python -m attnlab.tasks.prepare bible``), raw text ``{train,valid,test}.txt``, one line per example, or a Hugging
Face dataset saved with ``save_to_disk`` (its ``hf_field``, e.g. WikiText's ``text``; splits train / validation /
test), which are binarized once with a word-level vocabulary (whitespace tokens, no sentencepiece) into
``{data_dir}/.attnlab-bin``.
Each line ends in eos, and a split is one stream of tokens, lines back to back (fairseq's ``--sample-break-mode
none``); eos is predicted like any token (the line break).

Training: the stream cut into non-overlapping blocks; a sample is ``inputs = stream[i*T : (i+1)*T]``, ``targets =
stream[i*T+1 : (i+1)*T+1]`` with T = ``tokens_per_sample``; blocks shuffled, ``batch_size`` blocks per batch (or
``max_tokens // T``).

Evaluation (perplexity) with a sliding context: windows of ``tokens_per_sample`` tokens moved by ``eval_stride``
(default: ``tokens_per_sample``, non-overlapping blocks). The first window scores all its predictions; each later one
scores only its last ``eval_stride`` predictions, the preceding ``tokens_per_sample - eval_stride`` tokens being its
context (targets -100 there). Every token of the split is scored exactly once; a smaller stride gives each prediction
more context at the cost of recomputing it. A window's context and its scored block go through the network in one
parallel pass; tests/test_lm_task.py checks that this equals conditioning through the decoding interface
(``prefill`` of the context, then ``prefill`` of the block). The logged ``ppl`` is exp(mean negative
log-likelihood per scored token).
"""
from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from ..attention import ConfigError
from .fairseq_data import load_monolingual
from .sampling import eval_loader, train_loader
from .translation import data_bin

log = logging.getLogger("attnlab")


def load_stream(ds) -> torch.Tensor:
    """All sequences of an indexed dataset back to back (1-D int64)."""
    if len(ds) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([ds[i] for i in range(len(ds))])


class BlockDataset(Dataset):
    """Training blocks: item i -> (inputs (T,), targets (T,)) = stream[iT : iT+T], stream[iT+1 : iT+T+1]."""

    def __init__(self, stream: torch.Tensor, tokens_per_sample: int):
        self.stream, self.T = stream, tokens_per_sample
        self.n = max((len(stream) - 1) // tokens_per_sample, 0)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.stream[i * self.T: (i + 1) * self.T + 1]
        return s[:-1], s[1:].clone()


class WindowDataset(Dataset):
    """Evaluation windows: window k covers predictions [kS, kS+L) (inputs stream[kS : kS+L]); window 0 scores all
    of them, window k > 0 only those from L + (k-1)S on (its last S), so each prediction is scored once."""

    def __init__(self, stream: torch.Tensor, window: int, stride: int):
        if not 1 <= stride <= window:
            raise ConfigError(f"task.eval_stride={stride} must be in [1, tokens_per_sample={window}]")
        self.stream, self.L, self.S = stream, window, stride
        n_pred = max(len(stream) - 1, 0)
        self.n = 0 if n_pred == 0 else 1 + max(0, -(-(n_pred - window) // stride))

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        start = k * self.S
        end = min(start + self.L, len(self.stream) - 1)
        inputs = self.stream[start:end]
        targets = self.stream[start + 1:end + 1].clone()
        if k > 0:
            first_scored = self.L + (k - 1) * self.S  # stream position of the first prediction this window scores
            targets[: first_scored - start] = -100
        return inputs, targets


def make_collate(pad: int):
    def collate(samples):
        T = max(len(x) for x, _ in samples)
        inputs = torch.full((len(samples), T), pad, dtype=torch.long)
        targets = torch.full((len(samples), T), -100, dtype=torch.long)
        for b, (x, y) in enumerate(samples):
            inputs[b, : len(x)], targets[b, : len(y)] = x, y
        return {"inputs": inputs, "targets": targets}
    return collate


class LMDataModule(pl.LightningDataModule):
    batch_kind = "lm"

    def __init__(self, data_dir: str, tokens_per_sample: int = 512, batch_size: int | None = 16,
                 max_tokens: int | None = None, eval_stride: int | None = None, eval_batch_size: int | None = None,
                 format: str = "auto", valid_split: str = "valid", test_split: str = "test",
                 prepare_command: str | None = None, seed: int = 0, num_workers: int = 0, hf_field: str = "text"):
        super().__init__()
        if (batch_size is None) == (max_tokens is None):
            raise ConfigError("give exactly one of task.batch_size and task.max_tokens (the other null)")
        if max_tokens is not None and max_tokens < tokens_per_sample:
            raise ConfigError(f"task.max_tokens={max_tokens} is less than one block (tokens_per_sample="
                              f"{tokens_per_sample})")
        if format not in ("auto", "fairseq", "raw", "hf"):
            raise ConfigError(f"task.format={format!r}: expected auto, fairseq, raw or hf")
        stride = eval_stride or tokens_per_sample
        if not 1 <= stride <= tokens_per_sample:
            raise ConfigError(f"task.eval_stride={eval_stride} must be in [1, tokens_per_sample={tokens_per_sample}]")
        self.save_hyperparameters()
        self._loaded = False

    def _load(self):
        if self._loaded:
            return
        h = self.hparams
        # word-level: whitespace tokens, no sentencepiece
        bin_dir = data_bin(h.data_dir, h.format, h.prepare_command, False, None, None, h.hf_field, tokenizer="none")
        self.streams = {}
        for stage, split in (("train", "train"), ("val", h.valid_split), ("test", h.test_split)):
            ds, self.dictionary = load_monolingual(bin_dir, split)
            self.streams[stage] = load_stream(ds)
            log.info("%s: %d tokens, vocabulary %d", split, len(self.streams[stage]), len(self.dictionary))
        self._loaded = True

    def net_args(self) -> dict:
        self._load()
        return {"vocab_size": len(self.dictionary), "max_len": self.hparams.tokens_per_sample}

    def setup(self, stage=None):
        self._load()

    def train_dataloader(self):
        h = self.hparams
        bs = h.batch_size or h.max_tokens // h.tokens_per_sample
        return train_loader(BlockDataset(self.streams["train"], h.tokens_per_sample),
                            make_collate(self.dictionary.pad()), self.trainer, h.seed, h.num_workers,
                            batch_size=bs, shuffle=True)

    def _eval(self, stage):
        h = self.hparams
        bs = h.eval_batch_size or h.batch_size or h.max_tokens // h.tokens_per_sample
        ds = WindowDataset(self.streams[stage], h.tokens_per_sample, h.eval_stride or h.tokens_per_sample)
        return eval_loader(ds, make_collate(self.dictionary.pad()), self.trainer, h.num_workers, batch_size=bs)

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")
