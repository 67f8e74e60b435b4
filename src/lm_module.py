"""LightningModule for causal language-model tasks: copy, image generation (pixels as tokens), text LM.

A batch is ``{"inputs": (B, T) long, "targets": (B, T) long}`` with -100 where a position is not scored. Logged:
``{split}/loss`` (mean cross-entropy over scored tokens, nats), ``{split}/acc`` (per-token accuracy) and
``{split}/bits`` (loss in bits per token: bits/dim for images)."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class LMModule(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer, scheduler=None, scheduler_interval: str = "step",
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self._sums = {}

    def forward(self, inputs):
        return self.net(inputs)

    def _counts(self, batch):
        logits = self.net(batch["inputs"])
        targets = batch["targets"]
        scored = targets != -100
        n = scored.sum()
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
        correct = ((logits.argmax(-1) == targets) & scored).sum()
        return loss_sum, correct, n

    def on_train_batch_start(self, batch, batch_idx):
        # Randomness (dropout) depends only on (seed, step): a resumed run replays the uninterrupted one exactly.
        torch.manual_seed(self.hparams.seed * 1_000_003 + self.global_step)

    def training_step(self, batch, batch_idx):
        loss_sum, correct, n = self._counts(batch)
        loss = loss_sum / n.clamp_min(1)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}. Fix: lower `model.optimizer.lr`, set "
                f"`trainer.gradient_clip_val` (e.g. 1.0), add warm-up (`model/scheduler=inverse_sqrt`), or train in "
                f"`trainer.precision=32`; resume from the last good checkpoint with `ckpt_path=...`.")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", correct.float() / n.clamp_min(1), prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _eval_step(self, batch, split):
        loss_sum, correct, n = self._counts(batch)
        s = self._sums.setdefault(split, torch.zeros(3, dtype=torch.float64, device=self.device))
        s += torch.stack([loss_sum.double(), correct.double(), n.double()])

    def _eval_end(self, split):
        s = self._sums.pop(split, None)
        if s is None:
            return
        s = self.all_gather(s).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else s
        loss = s[0] / s[2].clamp_min(1)
        self.log_dict({f"{split}/loss": loss.float(), f"{split}/acc": (s[1] / s[2].clamp_min(1)).float(),
                       f"{split}/bits": (loss / math.log(2)).float()}, prog_bar=split == "val", sync_dist=False)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_end("test")

    def configure_optimizers(self):
        opt = self.hparams.optimizer(params=self.parameters())
        if not self.hparams.scheduler:  # None, or the empty model/scheduler=none
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.hparams.scheduler(optimizer=opt),
                                                   "interval": self.hparams.scheduler_interval}}
