"""phi(x) = elu(x) + 1 of q or k in one pass (Triton), so that the chunk kernels read mapped features.

Mapping inside the chunk kernels cost 0.20 of linear attention's 0.78 ms fwd+bwd at B=8, H=16, T=4096 on an H200:
each of the four kernels maps its q / k tiles again, and the serial state pass waits on every tile's exponentials
(kernels/NOTES.md, session 14). This pass reads x and writes phi(x) once, in x's dtype: for bfloat16 the same bits
as the kernels' own map (float32 math, then rounded for the dot), for float32 the same values. The backward then
takes phi'(x) from phi(x) itself: 1 where phi > 1 (x > 0), phi elsewhere, where phi = exp(x) (chunk._dfeat,
ELU1 = 2)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import _feat


@triton.jit
def _elu1_kernel(X, Y, N, T, H, sxb, sxh, sxt, syb, syh, syt, D: tl.constexpr, DP: tl.constexpr,
                 BR: tl.constexpr):
    """phi of BR rows of a (B, H, T, D) tensor (row = (b * H + h) * T + t), both tensors through their strides."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    t = rows % T
    bh = rows // T
    b, h = (bh // H).to(tl.int64), bh % H
    cd = tl.arange(0, DP)
    m = (rows < N)[:, None] & (cd < D)[None, :]
    x = tl.load(X + (b * sxb + h * sxh + t * sxt)[:, None] + cd[None, :], mask=m, other=0.0).to(tl.float32)
    y = _feat(x, m, 1)  # the chunk kernels' own map (ELU1 = 1)
    tl.store(Y + (b * syb + h * syh + t * syt)[:, None] + cd[None, :], y.to(Y.dtype.element_ty), mask=m)


def elu1_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) for x (B, H, T, d) with unit stride on d, in x's dtype and layout (torch.empty_like's)."""
    B, H, T, D = x.shape
    y = torch.empty_like(x)
    DP = triton.next_power_of_2(D)
    BR = max(1, 4096 // DP)
    N = B * H * T
    _elu1_kernel[(triton.cdiv(N, BR),)](x, y, N, T, H, *x.stride()[:3], *y.stride()[:3], D=D, DP=DP, BR=BR,
                                        num_warps=4)
    return y
