"""``ln_linear``: [LayerNorm] -> Linear -> [relu] -> [+ residual] in one launch (kernel.py says why), with dispatch.

Under autocast the matmul computes in the autocast dtype, as nn.Linear would; the norm and a residual sum stay in
float32 (as nn.LayerNorm and a float32 residual stream give). Gradients: none; this is the decoding path."""
from __future__ import annotations

import torch

from .. import use_triton
from .reference import ln_linear_ref


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear computes in here: autocast's when it is on, else the promotion of input and weight."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, weight.dtype)


def ln_linear(x, weight, bias=None, ln=None, act: str | None = None, residual=None, backend: str = "auto",
              static_weight: bool = False):
    """x (..., K) -> (..., N): ``act(LayerNorm(x) @ weight^T + bias) (+ residual)``. ``ln``: (weight, bias, eps).
    Output dtype: the compute dtype, or with a residual the promotion of the residual's dtype and it.
    ``static_weight``: the weight is not written by the kernel launched just before this one, so under
    programmatic dependent launch it may be loaded while that kernel finishes (kernels/pdl.py)."""
    if act not in (None, "relu"):
        raise ValueError(f"ln_linear: unknown activation {act!r}; expected 'relu' or None")
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K or (bias is not None and bias.shape != (N,)) \
            or (residual is not None and residual.shape != (*x.shape[:-1], N)):
        raise ValueError(f"ln_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)} do not fit together")
    cdt = compute_dtype(x, weight)
    if not use_triton(backend, x, weight) or cdt == torch.float64:
        return ln_linear_ref(x, weight, bias, ln, act, residual, cdt)
    from .kernel import launch
    x2 = x.reshape(-1, K)
    x2, w = (x2 if x2.stride(-1) == 1 else x2.contiguous()), (weight if weight.stride(-1) == 1 else weight.contiguous())
    r2 = None if residual is None else residual.reshape(-1, N)
    if r2 is not None and r2.stride(-1) != 1:
        r2 = r2.contiguous()
    odt = cdt if residual is None else torch.promote_types(residual.dtype, cdt)
    out = torch.empty(x2.shape[0], N, device=x.device, dtype=odt)
    launch(x2, w, bias, ln, act == "relu", r2, out, cdt, prefetch=static_weight)
    return out.view(*x.shape[:-1], N)


__all__ = ["ln_linear", "ln_linear_ref", "compute_dtype"]
