"""Learning-rate schedules not in torch.optim.lr_scheduler (those are used directly from the configs)."""
from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR


def inverse_sqrt(optimizer, warmup_steps: int = 4000, warmup_init_factor: float = 0.0):
    """fairseq's inverse_sqrt: linear warm-up to the base lr over ``warmup_steps``, then lr * sqrt(warmup/step)."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")

    def factor(step: int) -> float:
        step = step + 1
        if step < warmup_steps:
            return warmup_init_factor + (1 - warmup_init_factor) * step / warmup_steps
        return (warmup_steps / step) ** 0.5

    return LambdaLR(optimizer, factor)
