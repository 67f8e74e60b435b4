"""MemSizer read-out (Zhang & Cai, 2022) in plain PyTorch: the reference every kernel is tested against.

    y_t = c_t^{-1/2} sum_j (p_t . a_j) v_j = c_t^{-1/2} p_t^T M_t,    M_t = sum_j a_j v_j^T   (k x d)

j runs over the non-padded keys with j <= t (causal) or over all of them (bidirectional / cross); c_t counts those
keys, clamped to >= 1 so that a row that sees only padding reads zeros instead of NaN. p (B, T, k) is the
head-averaged slot distribution, a (B, S, k) the value-side "keys" and v (B, S, d) the values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear_attn.reference import causal_dot_chunked


def _check(p, a, v, causal, key_padding_mask):
    if p.dim() != 3 or a.dim() != 3 or v.dim() != 3 or p.shape[0] != a.shape[0] or a.shape[:2] != v.shape[:2] \
            or p.shape[-1] != a.shape[-1]:
        raise ValueError(f"memsizer: expected p (B, T, k), a (B, S, k), v (B, S, d); got p {tuple(p.shape)}, "
                         f"a {tuple(a.shape)}, v {tuple(v.shape)}")
    if causal and p.shape[1] != a.shape[1]:
        raise ValueError(f"memsizer: causal self-attention needs as many queries as keys (T == S); got T="
                         f"{p.shape[1]}, S={a.shape[1]}. For cross-attention pass causal=False")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or
                                         key_padding_mask.shape != a.shape[:2]):
        raise ValueError(f"memsizer: key_padding_mask must be bool of shape (B, S) = {tuple(a.shape[:2])}, True at "
                         f"padding; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def inv_sqrt_count(count: torch.Tensor, dtype) -> torch.Tensor:
    """c^{-1/2} with c clamped to >= 1, computed in at least float32 (a bf16 count is not exact past 256)."""
    c = count.to(torch.promote_types(dtype, torch.float32)).clamp_min(1.0)
    return c.rsqrt().to(dtype)


def memsizer_ref(p, a, v, causal: bool, key_padding_mask=None) -> torch.Tensor:
    """Returns (B, T, d). The causal form is a prefix sum over (B, T, k, d): no T x T tensor, but O(T k d) memory,
    so it is a reference, not a fast path."""
    _check(p, a, v, causal, key_padding_mask)
    if key_padding_mask is None:
        keep = torch.ones(a.shape[:2], dtype=torch.long, device=a.device)
    else:
        keep = (~key_padding_mask).long()
        a = a.masked_fill(key_padding_mask[..., None], 0.0)  # padded keys write nothing into the memory
    if causal:
        M = torch.cumsum(a[..., :, None] * v[..., None, :], dim=1)          # (B, T, k, d): M_t for every t
        y = torch.einsum("btk,btkd->btd", p, M)
        count = keep.cumsum(1)                                              # (B, T)
    else:
        M = torch.einsum("bsk,bsd->bkd", a, v)                             # one memory for all queries
        y = torch.einsum("btk,bkd->btd", p, M)
        count = keep.sum(1, keepdim=True)                                  # (B, 1)
    return y * inv_sqrt_count(count, y.dtype)[..., None]


def memsizer_chunked_torch(p, a, v, causal: bool, key_padding_mask=None, chunk: int = 64) -> torch.Tensor:
    """The same function as ``memsizer_ref`` computed chunk-wise: (p_t . a_j) explicitly inside a chunk of C
    positions (C x C, never T x T), the k x d memory of all earlier chunks carried by a prefix sum over chunks.
    (``causal_dot_chunked``, shared with linear attention). The CPU / fallback path: 20-60x faster than the (B, T, k, d) prefix sum, memory O(T/C k d)."""
    if not causal:  # the bidirectional reference already holds one k x d memory per sequence
        return memsizer_ref(p, a, v, False, key_padding_mask)
    _check(p, a, v, causal, key_padding_mask)
    if key_padding_mask is None:
        keep = torch.ones(a.shape[:2], dtype=torch.long, device=a.device)
    else:
        keep = (~key_padding_mask).long()
        a = a.masked_fill(key_padding_mask[..., None], 0.0)
    y = causal_dot_chunked(p, a, v, chunk)
    return y * inv_sqrt_count(keep.cumsum(1), y.dtype)[..., None]


def memsizer_step_ref(p, a, v, S, count, write=None):
    """One causal decoding step. p, a: (B, k); v: (B, d); S: (B, k, d) the unscaled memory sum_j a_j v_j^T so far;
    count: (B,) float, the keys in S. ``write`` (B,) bool: False for padding tokens, which are neither added nor
    counted (their output is still computed from the current state). Returns (y (B, d), S, count)."""
    if p.dim() != 2 or a.shape != p.shape or v.dim() != 2 or v.shape[0] != p.shape[0] \
            or S.shape != (*a.shape, v.shape[1]) or count.shape != p.shape[:1]:
        raise ValueError(f"memsizer_step: expected p, a (B, k), v (B, d), S (B, k, d), count (B,); got p "
                         f"{tuple(p.shape)}, a {tuple(a.shape)}, v {tuple(v.shape)}, S {tuple(S.shape)}, "
                         f"count {tuple(count.shape)}")
    if write is None:
        count = count + 1
    else:
        a = a.masked_fill(~write[:, None], 0.0)
        count = count + write.to(count.dtype)
    S = S + a[:, :, None] * v[:, None, :]
    y = torch.einsum("bk,bkd->bd", p, S) * inv_sqrt_count(count, S.dtype)[:, None]
    return y, S, count


def memsizer_decode_ref(proj, n_heads: int, ln_l, ln_r, S, count, residual):
    """The whole MemSizer decode step after its input projections, as the module's eager ops compute it under
    autocast (softmax, means and norms in float32): ``proj`` (B, H*k + k + d) = [Phi x | W_l x | W_r x];
    ``ln_l``, ``ln_r``: (weight, bias, eps). Returns (residual + y, S', count')."""
    B, k, d = S.shape
    f = lambda t: t.to(torch.promote_types(proj.dtype, torch.float32))  # noqa: E731 (float32 at least)
    p = f(proj[:, :n_heads * k]).view(B, n_heads, k).softmax(-1).mean(1)
    a = F.layer_norm(f(proj[:, n_heads * k:n_heads * k + k]), (k,), f(ln_l[0]), f(ln_l[1]), ln_l[2])
    v = F.layer_norm(f(proj[:, n_heads * k + k:]), (d,), f(ln_r[0]), f(ln_r[1]), ln_r[2])
    y, S, count = memsizer_step_ref(p, a, v, S, count)
    return residual + y, S, count
