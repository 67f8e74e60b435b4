"""MemSizer read-out through the linear-attention chunk kernels (kernels/linear_attn/chunk.py), as custom ops
(``attnlab::memsizer_fwd`` / ``_bwd``, with fake implementations and autograd, called as linear_attn/function.py
calls its own).

memsizer_ref is linear attention with one head, no feature map and no z-normalizer: y_t = r_t sum_j (p_t . a_j) v_j
with the row scale r_t = c_t^{-1/2} (c_t the non-pad keys seen, clamped to >= 1). The scale depends only on the
padding mask, so it is computed here (B*T floats) and the kernels multiply each row by it."""
from __future__ import annotations

import torch

from .. import eager_or_compiled
from ..linear_attn.chunk import chunk_bwd, chunk_fwd, fwd_runs
from .reference import _check, memsizer_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def row_scale(B, T, S, causal, key_padding_mask, device):
    """(B, T) float32: c_t^{-1/2} with c_t = non-pad keys j <= t (causal) or all non-pad keys, clamped to >= 1."""
    if key_padding_mask is None:
        c = torch.arange(1, T + 1, device=device, dtype=torch.float32).expand(B, T) if causal else \
            torch.full((B, T), float(S), device=device)
    else:
        keep = (~key_padding_mask).to(torch.float32)
        c = keep.cumsum(1) if causal else keep.sum(1, keepdim=True).expand(B, T)
    return c.clamp_min(1.0).rsqrt().contiguous()


def _memsizer_fwd(p: torch.Tensor, a: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o (B, T, d), the row scale r (B, T) float32, S0, z0 (empty when the forward kept no start states))."""
    B, T, _ = p.shape
    r = row_scale(B, T, a.shape[1], causal, mask, p.device)
    q4, k4, v4 = p.unsqueeze(1), a.unsqueeze(1), v.unsqueeze(1)  # one "head"
    o, _, S0, z0 = chunk_fwd(q4, k4, v4, causal=causal, elu1=False, norm=False, scale=r, mask=mask)
    if S0 is None:
        S0, z0 = r.new_empty(0), r.new_empty(0)
    return o.squeeze(1), r, S0, z0


memsizer_fwd = torch.library.custom_op("attnlab::memsizer_fwd", _memsizer_fwd, mutates_args=())


@memsizer_fwd.register_fake
def _(p, a, v, mask, causal):
    B, T, k = p.shape
    d = v.shape[2]
    o = p.new_empty(B, T, d)
    r = p.new_empty(B, T, dtype=torch.float32)
    n, sdt = fwd_runs(p.unsqueeze(1), a.unsqueeze(1), v.unsqueeze(1), causal)
    if n == 0:
        return o, r, r.new_empty(0), r.new_empty(0)
    return o, r, r.new_empty(n, B, k, d, dtype=sdt), r.new_empty(n, B, k)


def _memsizer_bwd(p: torch.Tensor, a: torch.Tensor, v: torch.Tensor, do: torch.Tensor, r: torch.Tensor,
                 S0: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    none = S0.numel() == 0
    dq, dk, dv = chunk_bwd(p.unsqueeze(1), a.unsqueeze(1), v.unsqueeze(1), None, do.unsqueeze(1), r,
                           None if none else S0, None if none else z0, causal=causal, elu1=False, norm=False,
                           scale=True, mask=mask)
    return dq.squeeze(1).contiguous(), dk.squeeze(1).contiguous(), dv.squeeze(1).contiguous()


memsizer_bwd = torch.library.custom_op("attnlab::memsizer_bwd", _memsizer_bwd, mutates_args=())


@memsizer_bwd.register_fake
def _(p, a, v, do, r, S0, z0, mask, causal):
    return (torch.empty(p.shape, dtype=p.dtype, device=p.device), torch.empty(a.shape, dtype=a.dtype, device=a.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup(ctx, inputs, output):
    p, a, v, mask, causal = inputs
    _, r, S0, z0 = output
    ctx.save_for_backward(p, a, v, r, S0, z0, mask)
    ctx.causal = causal


def _backward(bwd):
    def backward(ctx, do, dr, dS0, dz0):
        p, a, v, r, S0, z0, mask = ctx.saved_tensors
        dp, da, dv = bwd(p, a, v, do, r, S0, z0, mask, ctx.causal)
        return dp, da, dv, None, None
    return backward


memsizer_fwd.register_autograd(_backward(memsizer_bwd), setup_context=_setup)
_memsizer = eager_or_compiled(memsizer_fwd, _memsizer_fwd, _setup, _backward(_memsizer_bwd))


def memsizer_triton(p, a, v, causal: bool, key_padding_mask=None):
    """Same function as ``memsizer_ref``: p (B, T, k), a (B, S, k), v (B, S, d) -> (B, T, d) in p's dtype.
    float64 runs the reference (Triton has no fast fp64 matrix product)."""
    _check(p, a, v, causal, key_padding_mask)
    if not (p.dtype == a.dtype == v.dtype):
        raise ValueError(f"memsizer_triton: p, a, v must share one dtype; got {p.dtype}, {a.dtype}, {v.dtype}")
    if p.shape[1] == 0 or a.shape[1] == 0:
        raise ValueError(f"memsizer_triton: empty sequence (T={p.shape[1]}, S={a.shape[1]})")
    if p.dtype == torch.float64:
        return memsizer_ref(p, a, v, causal, key_padding_mask=key_padding_mask)
    if p.dtype not in DTYPES:
        raise TypeError(f"memsizer_triton: dtype {p.dtype} is not supported; use float32, bfloat16 or float16")
    return _memsizer(p, a, v, key_padding_mask, bool(causal))[0]
