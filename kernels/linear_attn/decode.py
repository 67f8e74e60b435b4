"""Linear attention's decode step from the layer input, in one launch (src/decoding/fused.py): LayerNorm, the
q / k / v projections of one head, and the state update + read-out of ``recurrent._step_kernel``,

    q, k, v = LN(x) W_{q,k,v}^T + b     (rounded to the compute dtype, as nn.Linear's outputs)
    S += phi(k) v^T,  z += phi(k),  y = phi(q)^T S / (phi(q) . z + eps)        (float32 state, elu + 1)

One program per (head, block of rows) owns those rows' d x d state of its head, so S and z are updated in place
without races. ``weight`` holds the three projections head by head: rows [q_h | k_h | v_h] for h = 0..H-1
(``pack_heads``). Reference: ``linear_decode_ref``. Saves the step's own launch and the q/k/v round trip through
memory: at batch 16 a launch costs about as much as the work in it (bench/RESULTS.md)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ln_linear.kernel import _TL, _dot, _normed
from ..ln_linear.reference import ln_linear_ref
from .reference import linear_attention_step_ref


def pack_heads(wq, wk, wv, n_heads: int) -> torch.Tensor:
    """(D, ...) q, k, v weights (or biases) -> (3D, ...) with each head's q, k, v rows together."""
    return torch.stack([t.unflatten(0, (n_heads, -1)) for t in (wq, wk, wv)], 1).flatten(0, 2)


def linear_decode_ref(x, ln, wq, wk, wv, bq, bk, bv, S, z, n_heads: int, eps: float = 1e-6, dtype=None):
    """What LayerNorm + three nn.Linear + ``linear_attention_step`` compute (autocast: matmuls in ``dtype``).
    x (B, D); S (B, H, d, d); z (B, H, d). Returns (y (B, D) in ``dtype``, S', z')."""
    B = x.shape[0]
    q, k, v = (ln_linear_ref(x, w, b, ln=ln, dtype=dtype).view(B, n_heads, -1)
               for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    y, S, z = linear_attention_step_ref(q.to(S.dtype), k.to(S.dtype), v.to(S.dtype), S, z, eps=eps)
    return y.flatten(1).to(dtype or x.dtype), S, z


@triton.jit
def _proj(x, W, Bias, rk, mk, cd, md, K, HAS_BIAS: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr):
    """x @ W[rows cd]^T (+ bias), rounded to CDT, as float32."""
    acc = _dot(x, tl.load(W + cd[None, :] * K + rk[:, None], mask=mk[:, None] & md[None, :], other=0.0), CDT, UPCAST)
    if HAS_BIAS:
        acc += tl.load(Bias + cd, mask=md, other=0.0).to(CDT).to(tl.float32)[None, :]
    return acc.to(CDT).to(tl.float32)


@triton.jit
def _decode_kernel(X, W, Bias, LW, LB, S, Z, Y, M, K, ln_eps, eps, sxm, ssb, ssh, ssk, szb, szh, sym,
                   HAS_BIAS: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr, DH: tl.constexpr,
                   BD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    h = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rk, cd = tl.arange(0, BK), tl.arange(0, BD)
    mm, mk, md = rm < M, rk < K, cd < DH
    m2 = mm[:, None] & mk[None, :]
    x = tl.load(X + rm.to(tl.int64)[:, None] * sxm + rk[None, :], mask=m2, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / K
    d = tl.where(m2, x - mean[:, None], 0.0)
    x = _normed(x, rk, mk, mean, 1.0 / tl.sqrt(tl.sum(d * d, 1) / K + ln_eps), LW, LB)
    W += h * 3 * DH * K
    Bias += h * 3 * DH
    q = _proj(x, W, Bias, rk, mk, cd, md, K, HAS_BIAS, CDT, UPCAST)
    k = _proj(x, W + DH * K, Bias + DH, rk, mk, cd, md, K, HAS_BIAS, CDT, UPCAST)
    v = _proj(x, W + 2 * DH * K, Bias + 2 * DH, rk, mk, cd, md, K, HAS_BIAS, CDT, UPCAST)
    q = tl.where(md[None, :], tl.where(q > 0, q + 1.0, tl.exp(q)), 0.0)  # elu + 1; padded columns add nothing
    k = tl.where(md[None, :], tl.where(k > 0, k + 1.0, tl.exp(k)), 0.0)
    zp = Z + rm.to(tl.int64)[:, None] * szb + h * szh + cd[None, :]
    mz = mm[:, None] & md[None, :]
    z = tl.load(zp, mask=mz, other=0.0) + k
    tl.store(zp, z, mask=mz)
    sp = S + rm.to(tl.int64)[:, None, None] * ssb + h * ssh + cd[None, :, None] * ssk + cd[None, None, :]
    ms = mm[:, None, None] & md[None, :, None] & md[None, None, :]
    st = tl.load(sp, mask=ms, other=0.0) + k[:, :, None] * v[:, None, :]
    tl.store(sp, st, mask=ms)
    scale = 1.0 / (tl.sum(q * z, 1) + eps)
    y = tl.sum(q[:, :, None] * st, 1) * scale[:, None]
    tl.store(Y + rm.to(tl.int64)[:, None] * sym + h * DH + cd[None, :], y.to(Y.dtype.element_ty), mask=mz)


def linear_decode_(x, ln, weight, bias, S, z, eps: float, cdt, out=None):
    """In place: S (B, H, d, d) and z (B, H, d) (float32) advance by one token. x (B, D), ``ln`` (weight, bias,
    eps), ``weight`` (3D, D) / ``bias`` (3D,) from ``pack_heads``. Returns out (B, D) = y in ``cdt``."""
    B, H, DH, _ = S.shape
    K = x.shape[1]
    if weight.shape != (3 * H * DH, K) or z.shape != (B, H, DH) or S.shape[-1] != DH or K > 1024:
        raise ValueError(f"linear_decode_: x {tuple(x.shape)}, weight {tuple(weight.shape)}, S {tuple(S.shape)}, "
                         f"z {tuple(z.shape)} do not fit (square heads, d_model <= 1024)")
    if S.dtype != torch.float32 or z.dtype != torch.float32 or S.stride(-1) != 1 or z.stride(-1) != 1 \
            or x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("linear_decode_: S and z must be float32; S, z, x with a unit last stride, weight "
                         "contiguous")
    out = torch.empty(B, H * DH, device=x.device, dtype=cdt) if out is None else out
    BM, BD = 16, max(16, triton.next_power_of_2(DH))
    _decode_kernel[(H, triton.cdiv(B, BM))](
        x, weight, bias if bias is not None else weight, ln[0], ln[1], S, z, out, B, K, ln[2], eps, x.stride(0),
        *S.stride()[:3], *z.stride()[:2], out.stride(0), HAS_BIAS=bias is not None, CDT=_TL[cdt],
        UPCAST=not x.is_cuda, DH=DH, BD=BD, BM=BM, BK=max(16, triton.next_power_of_2(K)),
        num_warps=4 if BM * BD * BD <= 8192 else 8)
    return out
