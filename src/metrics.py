"""Metrics that stay exact across processes: sums as float64 states, reduced by summing, divided at the end."""
from __future__ import annotations

import torch
from torchmetrics import Metric


class Ratio(Metric):
    """sum(numerator) / sum(denominator) over every batch of every process (token-weighted loss, accuracy, ...)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("num", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("den", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, num: torch.Tensor, den: torch.Tensor):
        self.num += num.detach().double().sum()
        self.den += den.detach().double().sum()

    def compute(self) -> torch.Tensor:
        return self.num / self.den.clamp_min(1)
