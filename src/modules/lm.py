"""Causal language models: copy, image generation (pixels as tokens), text LM.

A batch is ``{"inputs": (B, T) long, "targets": (B, T) long}`` with -100 where a position is not scored. Logged per
split: ``loss`` (mean cross-entropy over scored tokens, nats), ``acc`` (per-token accuracy), ``bits`` (loss in bits
per token: bits/dim for images) and ``ppl`` (perplexity).

A network with an adaptive softmax (``attnlab.adaptive``) is scored by ``head.nll`` on its hidden states, exactly the
cross-entropy of its full log-probabilities without building the (tokens, vocabulary) matrix. Its accuracy (the
argmax, one cluster at a time) is computed at evaluation only: in training it would cost every cluster on every
token, the very work the adaptive softmax saves, so ``train/acc`` is not logged for it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptive import AdaptiveSoftmax
from ..metrics import Ratio
from .base import BaseModule


class LMModule(BaseModule):
    batch_kind = "lm"

    def forward(self, inputs):
        return self.net(inputs)

    def make_metrics(self):
        return nn.ModuleDict({"loss": Ratio(), "acc": Ratio()})

    def token_counts(self, batch, train: bool = False):
        """(summed loss, correct predictions, scored tokens) of one batch; correct is None in training with an
        adaptive softmax (module docstring)."""
        targets = batch["targets"]
        scored = targets != -100
        head = getattr(self.net, "head", None)
        if isinstance(head, AdaptiveSoftmax):
            hidden = self.net.features(batch["inputs"])
            loss_sum = head.nll(hidden, targets).float().sum()
            correct = None if train else ((head.predict(hidden) == targets) & scored).sum()
            return loss_sum, correct, scored.sum()
        logits = self.net(batch["inputs"])
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
        correct = ((logits.argmax(-1) == targets) & scored).sum()
        return loss_sum, correct, scored.sum()

    def training_loss(self, batch):
        loss_sum, correct, n = self.token_counts(batch, train=True)
        if correct is not None:
            self.log("train/acc", correct.float() / n.clamp_min(1), prog_bar=True)
        return loss_sum, n

    def evaluate(self, batch, split):
        loss_sum, correct, n = self.token_counts(batch)
        self.metrics[split]["loss"].update(loss_sum, n)
        self.metrics[split]["acc"].update(correct, n)

    def derived(self, values):
        loss = values["loss"]
        return {"bits": loss / math.log(2), "ppl": torch.exp(loss.clamp_max(80))}
