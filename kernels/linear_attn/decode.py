"""Linear attention's decode step from the layer input, in one launch (src/decoding/fused.py): LayerNorm, the
q / k / v projections of one head, and the state update + read-out of ``recurrent._step_kernel``,

    q, k, v = LN(x) W_{q,k,v}^T + b     (rounded to the compute dtype, as nn.Linear's outputs)
    S += phi(k) v^T,  z += phi(k),  y = phi(q)^T S / (phi(q) . z + eps)        (float32 state, elu + 1)

One program per (head, batch row) owns that row's d x d state of its head, so S and z are updated in place
without races; the projections are matrix-vector products of the head's 3d x D weight rows (``fits`` says where
this beats the two-launch path: a first version with one program per head and 16 rows, on tensor cores, took
8.1 us per layer at batch 16, slower than the two launches' ~5 us; NOTES.md). ``weight`` holds the three projections head by head: rows [q_h | k_h | v_h] for h = 0..H-1
(``pack_heads``). Reference: ``linear_decode_ref``. Saves the step's own launch and the q/k/v round trip through
memory: at batch 16 a launch costs about as much as the work in it (bench/RESULTS.md)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ln_linear.kernel import _TL
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
def _proj(x, W, Bias, rk, mk, cd, md, K, HAS_BIAS: tl.constexpr, CDT: tl.constexpr):
    """x (BK,) @ W[rows cd]^T (+ bias) as a matrix-vector product (one row: no tensor-core tile to fill), its
    operands rounded to CDT and its result too, as nn.Linear's output; float32."""
    w = tl.load(W + cd[None, :] * K + rk[:, None], mask=mk[:, None] & md[None, :], other=0.0).to(CDT)
    acc = tl.sum(x.to(CDT).to(tl.float32)[:, None] * w.to(tl.float32), 0)
    if HAS_BIAS:
        acc += tl.load(Bias + cd, mask=md, other=0.0).to(CDT).to(tl.float32)
    return acc.to(CDT).to(tl.float32)


@triton.jit
def _decode_kernel(X, W, Bias, LW, LB, S, Z, Y, K, ln_eps, eps, sxm, ssb, ssh, ssk, szb, szh, sym,
                   HAS_BIAS: tl.constexpr, CDT: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr,
                   BK: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    rk, cd = tl.arange(0, BK), tl.arange(0, BD)
    mk, md = rk < K, cd < DH
    x = tl.load(X + b.to(tl.int64) * sxm + rk, mask=mk, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / K
    d = tl.where(mk, x - mean, 0.0)
    x = d / tl.sqrt(tl.sum(d * d, 0) / K + ln_eps) * tl.load(LW + rk, mask=mk, other=0.0).to(tl.float32) \
        + tl.load(LB + rk, mask=mk, other=0.0).to(tl.float32)
    W += h * 3 * DH * K
    Bias += h * 3 * DH
    q = _proj(x, W, Bias, rk, mk, cd, md, K, HAS_BIAS, CDT)
    k = _proj(x, W + DH * K, Bias + DH, rk, mk, cd, md, K, HAS_BIAS, CDT)
    v = _proj(x, W + 2 * DH * K, Bias + 2 * DH, rk, mk, cd, md, K, HAS_BIAS, CDT)
    q = tl.where(md, tl.where(q > 0, q + 1.0, tl.exp(q)), 0.0)  # elu + 1; padded columns add nothing
    k = tl.where(md, tl.where(k > 0, k + 1.0, tl.exp(k)), 0.0)
    zp = Z + b.to(tl.int64) * szb + h * szh + cd
    z = tl.load(zp, mask=md, other=0.0) + k
    tl.store(zp, z, mask=md)
    sp = S + b.to(tl.int64) * ssb + h * ssh + cd[:, None] * ssk + cd[None, :]
    ms = md[:, None] & md[None, :]
    st = tl.load(sp, mask=ms, other=0.0) + k[:, None] * v[None, :]
    tl.store(sp, st, mask=ms)
    y = tl.sum(q[:, None] * st, 0) * (1.0 / (tl.sum(q * z, 0) + eps))
    tl.store(Y + b.to(tl.int64) * sym + h * DH + cd, y.to(Y.dtype.element_ty), mask=md)


def fits(batch: int, d_model: int, head_dim: int) -> bool:
    """Where one launch beats two (LayerNorm + q/k/v matmul, then the step kernel): few rows (each program reads
    its head's weights, B * H programs in all) and a weight tile of <= 8192 numbers (registers)."""
    return batch <= 64 and triton.next_power_of_2(d_model) * max(16, triton.next_power_of_2(head_dim)) <= 8192


def linear_decode_(x, ln, weight, bias, S, z, eps: float, cdt, out=None):
    """In place: S (B, H, d, d) and z (B, H, d) (float32) advance by one token. x (B, D), ``ln`` (weight, bias,
    eps), ``weight`` (3D, D) / ``bias`` (3D,) from ``pack_heads``. Returns out (B, D) = y in ``cdt``."""
    B, H, DH, _ = S.shape
    K = x.shape[1]
    if weight.shape != (3 * H * DH, K) or z.shape != (B, H, DH) or S.shape[-1] != DH:
        raise ValueError(f"linear_decode_: x {tuple(x.shape)}, weight {tuple(weight.shape)}, S {tuple(S.shape)}, "
                         f"z {tuple(z.shape)} do not fit (square heads)")
    if S.dtype != torch.float32 or z.dtype != torch.float32 or S.stride(-1) != 1 or z.stride(-1) != 1 \
            or x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("linear_decode_: S and z must be float32; S, z, x with a unit last stride, weight "
                         "contiguous")
    out = torch.empty(B, H * DH, device=x.device, dtype=cdt) if out is None else out
    BD, BK = max(16, triton.next_power_of_2(DH)), triton.next_power_of_2(K)
    _decode_kernel[(H, B)](
        x, weight, bias if bias is not None else weight, ln[0], ln[1], S, z, out, K, ln[2], eps, x.stride(0),
        *S.stride()[:3], *z.stride()[:2], out.stride(0), HAS_BIAS=bias is not None, CDT=_TL[cdt], DH=DH, BD=BD,
        BK=BK, num_warps=4 if BK * BD <= 4096 else 8)
    return out
