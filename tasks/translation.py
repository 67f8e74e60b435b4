"""Sequence-to-sequence data (translation, summarization): a fairseq data-bin, raw text pairs, or a Hugging Face
dataset saved to disk.

``data_dir`` holds one of (``format: auto`` tells them apart):

- ``fairseq``: a data-bin as ``fairseq-preprocess`` / ``python -m attnlab.tasks.preprocess`` writes it
  (``dict.{src}.txt``, ``{split}.{src}-{tgt}.{lang}.bin/.idx``; see ``attnlab.tasks.fairseq_data``);
- ``raw``: text files ``{split}.{src}`` / ``{split}.{tgt}``, line i of each being pair i (splits train/valid/test);
- ``hf``: a ``datasets`` directory written by ``save_to_disk`` (fields named by ``hf_fields``).

Raw text and HF datasets are binarized once, through the preprocess entry point (sentencepiece trained on the
training text), into ``{data_dir}/.attnlab-bin/`` and read from there afterwards.

A sample is (id, source ids, target ids), each ending in eos. A batch (``collate``) is::

    {"src": (B, S) long, "src_pad_mask": (B, S) bool (True = padding), "tgt_in": (B, T) long ([bos] + target[:-1]),
     "targets": (B, T) long (the target; -100 at padding), "ids": (B,) long (sample index within the split)}

Length limits: ``truncate_source`` / ``truncate_target`` cut a side to that many tokens (eos kept), the usual
practice for summarization (documents longer than the model); the count is logged. Then a sample longer than
``max_source_positions`` / ``max_target_positions`` is skipped with a logged count (``too_long: skip``) or is an error
(``too_long: error``); nothing is truncated without being asked for. Training batches hold at most ``max_tokens``
padded tokens (fairseq's semantics, ``attnlab.tasks.sampling``), or ``batch_size`` pairs.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from ..attention import ConfigError
from .fairseq_data import load_parallel
from .sampling import eval_loader, train_loader

log = logging.getLogger("attnlab")
BIN_CACHE = ".attnlab-bin"
SPLIT_NAMES = ("train", "valid", "test")


def missing_data_error(data_dir, prepare_command: str | None) -> FileNotFoundError:
    fix = (f"build the shipped corpus with `{prepare_command}`" if prepare_command
           else "point `task.data_dir` at a data-bin, raw text or a saved Hugging Face dataset")
    return FileNotFoundError(f"{data_dir}: no data there. Fix: {fix} (or set `task.data_dir`).")


def detect_format(data_dir: Path, parallel: bool) -> str:
    if (data_dir / "dataset_dict.json").is_file() or (data_dir / "dataset_info.json").is_file():
        return "hf"
    if any(data_dir.glob("*.idx")):
        return "fairseq"
    return "raw"


def data_bin(data_dir, fmt: str, prepare_command: str | None, parallel: bool, *binarize_args, **binarize_kw) -> Path:
    """The data-bin to read for ``data_dir``: itself when it is one, else its raw text / HF dataset binarized once
    (``binarize_once(data_dir, fmt, *binarize_args, **binarize_kw)``); ``fmt`` "auto" is detected. A missing folder
    is an error naming ``prepare_command``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise missing_data_error(data_dir, prepare_command)
    fmt = detect_format(data_dir, parallel) if fmt == "auto" else fmt
    return data_dir if fmt == "fairseq" else binarize_once(data_dir, fmt, *binarize_args, **binarize_kw)


def binarize_once(data_dir: Path, fmt: str, src: str | None, tgt: str | None, hf_fields: str | None = None,
                  tokenizer: str = "spm", vocab_size: int = 8000) -> Path:
    """Raw text / an HF dataset -> ``{data_dir}/.attnlab-bin`` (once; a complete directory appears atomically, so
    concurrent processes never read half of one). Returns the data-bin to read."""
    from .preprocess import preprocess
    from .text_sources import read_hf_dataset, read_lines, read_parallel
    out = data_dir / BIN_CACHE
    if (out / "preprocess.json").is_file():
        return out
    splits: dict[str, list] = {}
    if fmt == "hf":
        if not hf_fields:
            raise ConfigError(f"{data_dir} is a Hugging Face dataset: name its text field(s) with `task.hf_fields` "
                              "(e.g. translation.en,translation.de, or article,highlights; one field for an LM)")
        fields = hf_fields.split(",")
        for name, rows in read_hf_dataset(data_dir, fields).items():
            splits[name] = rows if src else [r[0] for r in rows]
    else:
        for split in SPLIT_NAMES:
            if src:
                if (data_dir / f"{split}.{src}").is_file():
                    splits[split] = read_parallel(data_dir / f"{split}.{src}", data_dir / f"{split}.{tgt}")
            else:
                path = data_dir / f"{split}.txt"
                if path.is_file():
                    splits[split] = read_lines(path)
        if "train" not in splits:
            want = f"train.{src} and train.{tgt}" if src else "train.txt"
            raise FileNotFoundError(f"{data_dir}: raw text needs {want} (and valid/test the same way); found "
                                    f"{sorted(p.name for p in data_dir.iterdir())[:10]}")
    tmp = Path(tempfile.mkdtemp(prefix=".attnlab-bin.tmp-", dir=data_dir))
    try:
        log.info("binarizing %s (%s) into %s", data_dir, fmt, out)
        preprocess(tmp, splits, src, tgt, tokenizer=tokenizer, vocab_size=vocab_size,
                   joined_dictionary=bool(src), log=log.info)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def post_process_of(bin_dir: Path) -> str | None:
    """How ids turn back into text: from preprocess.json (sentencepiece), else None (whitespace-joined tokens)."""
    import json
    meta = bin_dir / "preprocess.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("post_process")
    return None


class PairDataset(Dataset):
    """The kept samples of one split: item -> (id, src ids, tgt ids)."""

    def __init__(self, src, tgt, keep: np.ndarray, truncate_source: int | None, truncate_target: int | None,
                 eos: int):
        self.src, self.tgt, self.keep = src, tgt, keep
        self.truncate_source, self.truncate_target, self.eos = truncate_source, truncate_target, eos

    def __len__(self):
        return len(self.keep)

    @staticmethod
    def _cut(x: torch.Tensor, n: int | None, eos: int) -> torch.Tensor:
        if n is None or len(x) <= n:
            return x
        return torch.cat([x[: n - 1], x.new_full((1,), eos)])

    def __getitem__(self, i):
        j = int(self.keep[i])
        return (j, self._cut(self.src[j], self.truncate_source, self.eos),
                self._cut(self.tgt[j], self.truncate_target, self.eos))


def make_collate(pad: int, bos: int):
    def collate(samples):
        B = len(samples)
        S = max(len(s) for _, s, _ in samples)
        T = max(len(t) for _, _, t in samples)
        src = torch.full((B, S), pad, dtype=torch.long)
        src_pad_mask = torch.ones(B, S, dtype=torch.bool)
        tgt_in = torch.full((B, T), pad, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        for b, (_, s, t) in enumerate(samples):
            src[b, : len(s)], src_pad_mask[b, : len(s)] = s, False
            targets[b, : len(t)] = t
            tgt_in[b, 0] = bos
            tgt_in[b, 1: len(t)] = t[:-1]
        ids = torch.tensor([j for j, _, _ in samples], dtype=torch.long)
        return {"src": src, "src_pad_mask": src_pad_mask, "tgt_in": tgt_in, "targets": targets, "ids": ids}
    return collate


class Seq2SeqDataModule(pl.LightningDataModule):
    batch_kind = "seq2seq"

    def __init__(self, data_dir: str, source_lang: str, target_lang: str, format: str = "auto",
                 max_tokens: int | None = 4096, batch_size: int | None = None, eval_max_tokens: int | None = None,
                 max_source_positions: int = 1024, max_target_positions: int = 1024, too_long: str = "skip",
                 truncate_source: int | None = None, truncate_target: int | None = None,
                 valid_split: str = "valid", test_split: str = "test", reference_dir: str | None = None,
                 hf_fields: str | None = None, vocab_size: int = 8000, prepare_command: str | None = None,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if too_long not in ("skip", "error"):
            raise ConfigError(f"task.too_long={too_long!r}: expected 'skip' (drop and count) or 'error'")
        if format not in ("auto", "fairseq", "raw", "hf"):
            raise ConfigError(f"task.format={format!r}: expected auto, fairseq, raw or hf")
        for name, n in (("truncate_source", truncate_source), ("truncate_target", truncate_target)):
            if n is not None and n < 2:
                raise ConfigError(f"task.{name}={n}: keep at least one token and eos (>= 2), or null for no cut")
        self.save_hyperparameters()
        self._loaded = False

    # -- data ---------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        h = self.hparams
        bin_dir = data_bin(h.data_dir, h.format, h.prepare_command, True, h.source_lang, h.target_lang,
                           h.hf_fields, vocab_size=h.vocab_size)
        self.bin_dir = bin_dir
        self.post_process = post_process_of(bin_dir)
        self.datasets, self.raw_sizes = {}, {}
        names = {"train": "train", "val": h.valid_split, "test": h.test_split}
        for stage, split in names.items():
            src, tgt, self.src_dict, self.tgt_dict = load_parallel(bin_dir, split, h.source_lang, h.target_lang)
            self.datasets[stage] = self._filter(stage, split, src, tgt)
        self.split_names = names
        self._references: dict[str, list[str]] = {}
        self._loaded = True

    def _filter(self, stage, split, src, tgt) -> PairDataset:
        h = self.hparams
        s_len, t_len = src.sizes.copy(), tgt.sizes.copy()
        for name, lens, n in (("source", s_len, h.truncate_source), ("target", t_len, h.truncate_target)):
            if n is not None:
                cut = int((lens > n).sum())
                if cut:
                    log.info("%s: %d of %d %ss truncated to %d tokens (task.truncate_%s)", split, cut, len(lens),
                             name, n, name)
                np.minimum(lens, n, out=lens)
        too_long = (s_len > h.max_source_positions) | (t_len > h.max_target_positions)
        n_bad = int(too_long.sum())
        if n_bad:
            i = int(np.flatnonzero(too_long)[0])
            what = (f"{split}: {n_bad} of {len(s_len)} samples longer than max_source_positions="
                    f"{h.max_source_positions} / max_target_positions={h.max_target_positions} (e.g. sample {i}: "
                    f"{s_len[i]} source, {t_len[i]} target tokens)")
            if h.too_long == "error":
                raise ValueError(f"{what}. Fix: raise task.max_source_positions/max_target_positions, truncate "
                                 f"(task.truncate_source/truncate_target), or task.too_long=skip")
            log.warning("%s: skipped (task.too_long=skip)%s", what,
                        "; the metric is over the kept samples only" if stage != "train" else "")
        keep = np.flatnonzero(~too_long)
        if stage == "train" and not len(keep):
            raise ValueError(f"{split}: every sample is longer than the limits; raise task.max_*_positions")
        self.raw_sizes[stage] = (s_len[keep], t_len[keep])
        return PairDataset(src, tgt, keep, h.truncate_source, h.truncate_target, self.src_dict.eos())

    def net_args(self) -> dict:
        self._load()
        max_s = max(int(s.max()) for s, _ in self.raw_sizes.values() if len(s))
        max_t = max(int(t.max()) for _, t in self.raw_sizes.values() if len(t))
        joint = self.src_dict == self.tgt_dict
        return {"src_vocab_size": None if joint else len(self.src_dict), "vocab_size": len(self.tgt_dict),
                "max_source_len": max_s, "max_target_len": max_t, "pad_id": self.tgt_dict.pad()}

    # -- what the module needs to turn ids into text --------------------------------------------------------------
    @property
    def special_ids(self) -> dict:
        self._load()
        d = self.tgt_dict
        return {"bos": d.bos(), "eos": d.eos(), "pad": d.pad()}

    def decode(self, ids) -> str:
        """Target ids -> detokenized text (sentencepiece undone)."""
        self._load()
        return self.tgt_dict.string(ids, post_process=self.post_process)

    def encode_source(self, line: str) -> torch.Tensor:
        """Raw source text -> ids as the training data were made (sentencepiece model of the data-bin if any)."""
        self._load()
        spm_path = self.bin_dir / "spm.model"
        if spm_path.is_file():
            from .preprocess import Tokenizer
            if not hasattr(self, "_tok"):
                self._tok = Tokenizer(spm_path.read_bytes())
            tokens = self._tok([line])[0]
        else:
            tokens = line.split()
        return self.src_dict.encode_line(tokens, append_eos=True)

    def reference(self, stage: str, index: int) -> str:
        """The reference text of sample ``index`` of a split: the raw line from ``reference_dir`` when given (the
        untouched text, not the tokenized round trip), else the decoded (untruncated) target ids."""
        self._load()
        if stage not in self._references:
            split = self.split_names[stage]
            rd = self.hparams.reference_dir
            if rd:
                from .text_sources import read_lines
                path = Path(rd) / f"{split}.{self.hparams.target_lang}"
                refs = read_lines(path)
                if len(refs) != len(self.datasets[stage].tgt):
                    raise ValueError(f"{path}: {len(refs)} lines but the data-bin split has "
                                     f"{len(self.datasets[stage].tgt)} samples; reference_dir must hold the raw text "
                                     "the data-bin was made from")
            else:
                tgt = self.datasets[stage].tgt
                refs = [self.decode(tgt[i]) for i in range(len(tgt))]
            self._references[stage] = refs
        return self._references[stage][index]

    # -- loaders --------------------------------------------------------------------------------------------------
    def setup(self, stage=None):
        self._load()

    def _batching(self, stage: str, max_tokens: int | None) -> dict:
        h = self.hparams
        if max_tokens is None:
            return {"batch_size": h.batch_size}
        s, t = self.raw_sizes[stage]
        return {"max_tokens": max_tokens, "lengths": np.maximum(s, t)}

    def _collate(self):
        sp = self.special_ids
        return make_collate(sp["pad"], sp["bos"])

    def train_dataloader(self):
        h = self.hparams
        return train_loader(self.datasets["train"], self._collate(), self.trainer, h.seed, h.num_workers,
                            shuffle=True, **self._batching("train", h.max_tokens))

    def _eval(self, stage):
        h = self.hparams
        mt = h.eval_max_tokens or h.max_tokens
        return eval_loader(self.datasets[stage], self._collate(), self.trainer, h.num_workers,
                           **self._batching(stage, mt))

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")
