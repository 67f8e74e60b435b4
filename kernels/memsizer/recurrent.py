"""One MemSizer decoding step in one Triton launch (the linear-attention step kernel in its count mode):

    S' = S + a v^T,   count' = count + 1,   y = p^T S' / sqrt(max(count', 1))

for rows with write=True; other rows keep S and count. memsizer_step_ writes S, count and out in place and
allocates nothing (CUDA-graph safe)."""
from __future__ import annotations

import torch

from ..linear_attn.recurrent import launch_step


def _check(p, a, v, S, count, write):
    if p.dim() != 2 or a.shape != p.shape or v.dim() != 2 or v.shape[0] != p.shape[0] \
            or S.shape != (*a.shape, v.shape[1]) or count.shape != p.shape[:1]:
        raise ValueError(f"memsizer_step: expected p, a (B, k), v (B, d), S (B, k, d), count (B,); got p "
                         f"{tuple(p.shape)}, a {tuple(a.shape)}, v {tuple(v.shape)}, S {tuple(S.shape)}, "
                         f"count {tuple(count.shape)}")
    if write is not None and (write.dtype != torch.bool or tuple(write.shape) != p.shape[:1]):
        raise ValueError(f"write must be a bool tensor of shape (B,) = ({p.shape[0]},); got {write.dtype} "
                         f"{tuple(write.shape)}")
    if torch.float64 in (p.dtype, S.dtype, count.dtype):
        raise TypeError("the Triton MemSizer step has no float64 path; use backend='torch' for float64")
    if not count.is_floating_point():
        raise TypeError(f"memsizer_step: count must be a float tensor, got {count.dtype}")


def _c(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def memsizer_step_(p, a, v, S, count, out, write=None):
    """In place: S (B, k, d) and count (B,) are updated, out (B, d) receives y. Returns out."""
    _check(p, a, v, S, count, write)
    launch_step(p[:, None], a[:, None], v[:, None], S[:, None], count, S[:, None], count, out[:, None], write,
                0.0, False, False)
    return out


def memsizer_step_triton(p, a, v, S, count, write=None):
    """Same as ``memsizer_step_ref``: returns (y, S', count') and leaves S, count untouched."""
    _check(p, a, v, S, count, write)
    sdt = torch.promote_types(S.dtype, torch.promote_types(a.dtype, v.dtype))
    ydt = torch.promote_types(p.dtype, sdt)
    S_out = torch.empty(S.shape, device=S.device, dtype=sdt)
    c_out = torch.empty(count.shape, device=count.device, dtype=count.dtype)
    y = torch.empty(v.shape, device=v.device, dtype=ydt)
    launch_step(_c(p)[:, None], _c(a)[:, None], _c(v)[:, None], _c(S)[:, None], count, S_out[:, None], c_out,
                y[:, None], write, 0.0, False, False)
    return y, S_out, c_out
