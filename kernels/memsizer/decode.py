"""MemSizer's decode step from its input projections, in one launch (src/decoding/fused.py): per batch row, the
H softmaxes over the k slots and their mean (p), the two LayerNorms (a over k, v over d), the memory update
S += a v^T, count += 1, the read-out y = p^T S / sqrt(count), and the residual add x + y. Everything in float32,
as the module's softmax / LayerNorm / state compute under autocast; S and count are updated in place.
Reference: ``reference.memsizer_decode_ref``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pdl import launch_options, pdl, wait_previous


@triton.jit
def _ln_stats(X, N, eps, BN: tl.constexpr):
    """Mean and 1/std of the N numbers at X (float32, two passes)."""
    s = tl.zeros([BN], tl.float32)
    for n0 in range(0, N, BN):
        c = n0 + tl.arange(0, BN)
        s += tl.load(X + c, mask=c < N, other=0.0).to(tl.float32)
    mean = tl.sum(s, 0) / N
    s = tl.zeros([BN], tl.float32)
    for n0 in range(0, N, BN):
        c = n0 + tl.arange(0, BN)
        d = tl.where(c < N, tl.load(X + c, mask=c < N, other=0.0).to(tl.float32) - mean, 0.0)
        s += d * d
    return mean, 1.0 / tl.sqrt(tl.sum(s, 0) / N + eps)


@triton.jit
def _write_read(S, X, OUT, LRW, LRB, r, cv, mv, mean, rstd, a, p, ck, mk, ssk, scale):
    """For the columns cv: v = LayerNorm(r), S += a v^T (stored), out = x + p^T S * scale (stored)."""
    v = (r - mean) * rstd * tl.load(LRW + cv, mask=mv, other=0.0).to(tl.float32) \
        + tl.load(LRB + cv, mask=mv, other=0.0).to(tl.float32)
    ms = mk[:, None] & mv[None, :]
    st = tl.load(S + ck[:, None] * ssk + cv[None, :], mask=ms, other=0.0) + a[:, None] * v[None, :]
    tl.store(S + ck[:, None] * ssk + cv[None, :], st, mask=ms)
    y = tl.sum(p[:, None] * st, 0) * scale
    x = tl.load(X + cv, mask=mv, other=0.0).to(tl.float32)
    tl.store(OUT + cv, (x + y).to(OUT.dtype.element_ty), mask=mv)


@triton.jit
def _decode_kernel(P, LLW, LLB, LRW, LRB, S, C, X, OUT, H, KS, D, eps_l, eps_r, spb, ssb, ssk, sxb, sob,
                   BH: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr, ONE_TILE: tl.constexpr,
                   PDL: tl.constexpr):
    wait_previous(PDL)
    b = tl.program_id(0)
    P += b.to(tl.int64) * spb
    ch, ck = tl.arange(0, BH), tl.arange(0, BKS)
    mk = ck < KS
    m2 = (ch < H)[:, None] & mk[None, :]
    logit = tl.load(P + ch[:, None] * KS + ck[None, :], mask=m2, other=0.0).to(tl.float32)
    e = tl.where(m2, tl.exp(logit - tl.max(tl.where(m2, logit, float("-inf")), 1)[:, None]), 0.0)
    inv = tl.where(ch < H, 1.0 / tl.maximum(tl.sum(e, 1), 1e-30), 0.0)  # padded head rows: all zero
    p = tl.sum(e * inv[:, None], 0) / H  # (BKS,), 0 on padded slots
    L, R = P + H * KS, P + H * KS + KS
    mean, rstd = _ln_stats(L, KS, eps_l, BKS)
    a = (tl.load(L + ck, mask=mk, other=0.0).to(tl.float32) - mean) * rstd
    a = tl.where(mk, a * tl.load(LLW + ck, mask=mk, other=0.0).to(tl.float32)
                 + tl.load(LLB + ck, mask=mk, other=0.0).to(tl.float32), 0.0)
    c = tl.load(C + b) + 1.0
    tl.store(C + b, c)
    scale = 1.0 / tl.sqrt(tl.maximum(c, 1.0))
    S += b.to(tl.int64) * ssb
    X += b * sxb
    OUT += b * sob
    if ONE_TILE:  # d <= BV: the values loaded once, their statistics from the registers
        cv = tl.arange(0, BV)
        mv = cv < D
        r = tl.load(R + cv, mask=mv, other=0.0).to(tl.float32)
        mean = tl.sum(r, 0) / D
        d = tl.where(mv, r - mean, 0.0)
        _write_read(S, X, OUT, LRW, LRB, r, cv, mv, mean, 1.0 / tl.sqrt(tl.sum(d * d, 0) / D + eps_r), a, p,
                    ck, mk, ssk, scale)
    else:
        mean, rstd = _ln_stats(R, D, eps_r, BV)
        for v0 in range(0, D, BV):
            cv = v0 + tl.arange(0, BV)
            mv = cv < D
            r = tl.load(R + cv, mask=mv, other=0.0).to(tl.float32)
            _write_read(S, X, OUT, LRW, LRB, r, cv, mv, mean, rstd, a, p, ck, mk, ssk, scale)


def memsizer_decode_(proj, n_heads: int, ln_l, ln_r, S, count, residual, out=None):
    """In place: S (B, k, d) and count (B,) (float32) advance by one token; returns out (B, d) = residual + y
    (dtype: the residual's). ``proj``, ``ln_l``, ``ln_r``: as ``reference.memsizer_decode_ref``."""
    B, KS, D = S.shape
    if proj.shape != (B, n_heads * KS + KS + D) or residual.shape != (B, D) or count.shape != (B,):
        raise ValueError(f"memsizer_decode_: proj {tuple(proj.shape)}, S {tuple(S.shape)}, count "
                         f"{tuple(count.shape)}, residual {tuple(residual.shape)} do not fit n_heads={n_heads}")
    if S.dtype != torch.float32 or count.dtype != torch.float32 or S.stride(-1) != 1 or not count.is_contiguous():
        raise ValueError("memsizer_decode_: S and count must be float32, S with a unit last stride, count contiguous")
    if proj.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError("memsizer_decode_: proj and residual need a unit last stride")
    out = torch.empty_like(residual) if out is None else out
    BKS = max(16, triton.next_power_of_2(KS))
    BV = max(16, min(triton.next_power_of_2(D), 8192 // BKS))  # an S tile of <= 8192 floats
    _decode_kernel[(B,)](proj, ln_l[0], ln_l[1], ln_r[0], ln_r[1], S, count, residual, out, n_heads, KS, D,
                         ln_l[2], ln_r[2], proj.stride(0), S.stride(0), S.stride(1), residual.stride(0),
                         out.stride(0), BH=max(2, triton.next_power_of_2(n_heads)), BKS=BKS, BV=BV,
                         ONE_TILE=D <= BV, PDL=pdl(proj), num_warps=4 if BKS * BV <= 4096 else 8,
                         **launch_options(proj))
    return out
