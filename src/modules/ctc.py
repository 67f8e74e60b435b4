"""CTC speech recognition: an acoustic model (``attnlab.speech``) trained with the CTC loss.

A batch is ``{"features": (B, T, F) float, "feature_lengths": (B,), "targets": (B, U) long (padded),
"target_lengths": (B,)}``; label 0 is the blank. The training loss is the CTC negative log-likelihood summed over the
batch and divided by the number of target labels (across ranks, by BaseModule). Logged per split: ``loss`` (nats per
target label) and the error rates named in ``metrics``: ``per`` (edit distance over label ids / reference labels:
the phoneme error rate for phoneme targets, the character error rate for character targets), ``cer`` and ``wer``
(over the characters / words of the decoded text, which the datamodule's ``label_text(ids)`` spells). The seconds
each training epoch took (validation excluded) are logged as ``train/epoch_seconds`` (the time column of
Katharopoulos et al.'s Table 3).
"""
from __future__ import annotations

import time

import torch.nn.functional as F
from torch import nn

from ..asr_metrics import ErrorRate
from ..decoding.ctc import beam_decode, greedy_decode
from ..metrics import Ratio
from .base import BaseModule

METRICS = {"per": "token", "cer": "char", "wer": "word"}


class CTCModule(BaseModule):
    batch_kind = "ctc"

    def __init__(self, net: nn.Module, optimizer: dict, scheduler: dict | None = None,
                 scheduler_interval: str = "step", seed: int = 0, compile: bool | str = False,
                 metrics: tuple[str, ...] = ("per",), decoder: str = "greedy", beam_size: int = 8,
                 beam_prune: float | None = -10.0):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown CTC metrics {unknown}; choose from {sorted(METRICS)} (`model.metrics`)")
        if decoder not in ("greedy", "beam"):
            raise ValueError(f"model.decoder must be 'greedy' or 'beam', got {decoder!r}")
        self._metric_names = tuple(metrics)
        super().__init__(net, optimizer, scheduler, scheduler_interval, seed, compile)
        self._epoch_start, self._val_start, self._val_seconds = None, 0.0, 0.0

    def forward(self, features, lengths):
        return self.net(features, lengths)

    def make_metrics(self):
        out = {"loss": Ratio()}
        out.update({name: ErrorRate(METRICS[name]) for name in self._metric_names})
        return nn.ModuleDict(out)

    def ctc_loss_sum(self, batch):
        log_probs, out_lengths = self.net(batch["features"], batch["feature_lengths"])
        # zero_infinity: an utterance with more labels than output frames contributes nothing instead of inf
        loss = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], out_lengths, batch["target_lengths"],
                          blank=0, reduction="sum", zero_infinity=True)
        return loss, batch["target_lengths"].sum(), log_probs, out_lengths

    def training_loss(self, batch):
        loss, n, _, _ = self.ctc_loss_sum(batch)
        return loss, n

    def decode(self, log_probs, lengths) -> list[list[int]]:
        if self.hparams.decoder == "beam":
            return beam_decode(log_probs, lengths, self.hparams.beam_size, prune=self.hparams.beam_prune)
        return greedy_decode(log_probs, lengths)

    def evaluate(self, batch, split):
        loss, n, log_probs, lengths = self.ctc_loss_sum(batch)
        self.metrics[split]["loss"].update(loss, n)
        hyps = self.decode(log_probs, lengths)
        refs = [t[:k].tolist() for t, k in zip(batch["targets"].cpu(), batch["target_lengths"].tolist())]
        if "per" in self._metric_names:
            self.metrics[split]["per"].update(hyps, refs)
        if "cer" in self._metric_names or "wer" in self._metric_names:
            spell = getattr(self.trainer.datamodule, "label_text", None) if self._trainer else None
            if spell is None:
                raise ValueError("cer / wer need the datamodule's label_text(ids) to spell the labels; "
                                 "use `model.metrics=[per]` with this task")
            hyp_text, ref_text = [spell(h) for h in hyps], [spell(r) for r in refs]
            for name in ("cer", "wer"):
                if name in self._metric_names:
                    self.metrics[split][name].update(hyp_text, ref_text)

    # -- time per epoch (training only: validation runs inside the epoch and is subtracted) ----------------------
    def on_train_epoch_start(self):
        self._epoch_start, self._val_seconds = time.perf_counter(), 0.0

    def on_validation_start(self):
        self._val_start = time.perf_counter()

    def on_validation_end(self):
        if self._epoch_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start

    def on_train_epoch_end(self):
        if self._epoch_start is not None:
            self.log("train/epoch_seconds", time.perf_counter() - self._epoch_start - self._val_seconds)
