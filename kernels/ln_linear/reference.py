"""PyTorch reference of ``ln_linear``: what the eager modules compute, op by op, in the same dtypes."""
from __future__ import annotations

import torch.nn.functional as F


def ln_linear_ref(x, weight, bias=None, ln=None, act: str | None = None, residual=None, dtype=None):
    """y = act(LayerNorm(x) @ weight^T + bias) (+ residual), each step as nn.LayerNorm / nn.Linear / F.relu and the
    residual ``+`` compute it under autocast: the norm in float32, the matmul in ``dtype`` (the autocast dtype; the
    inputs' dtype when None) with its result rounded to ``dtype``, the residual sum in the promoted dtype.
    ``ln`` = (weight, bias, eps) of a LayerNorm over x's last dimension."""
    dtype = dtype or x.dtype
    if ln is not None:
        w, b, eps = ln
        x = F.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps)
    y = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if act == "relu":
        y = F.relu(y)
    elif act is not None:
        raise ValueError(f"ln_linear: unknown activation {act!r}; expected 'relu' or None")
    return y if residual is None else residual + y
