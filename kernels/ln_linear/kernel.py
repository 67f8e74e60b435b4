"""``ln_linear`` in one Triton launch: [LayerNorm] -> x @ W^T + b -> [relu] -> [+ residual].

Made for decoding, where a step of a small model is a chain of matmuls with 1..256 rows, each a few microseconds of
work behind a launch of its own: fusing the norm before a projection and the activation or residual add after it
takes a layer's step from ~20 kernels to 5 (src/decoding/fused.py). A program owns BM rows and BN output columns and
walks K in BK steps; with a norm it first walks K once for the row mean and variance (float32, two passes, no
Welford needed at these widths). The matmul takes its operands in the compute dtype CDT (the autocast dtype) with a
float32 accumulator, and its result is rounded to CDT before the activation and the residual, as the eager
modules round F.linear's output. float32 operands use exact float32 dots (no TF32), like torch's default matmul.
On the CPU (Triton's interpreter, whose dot on bf16 multiplies the raw bits) the CDT-rounded operands are dotted
in float32: the same values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pdl import launch_options, pdl, wait_previous

# Tiles: BN output columns per program, BN_SMALL when the call has few rows and columns (a decode step at batch 16:
# more programs, each reading less of the weight); BK of K per step (K <= BK: one tile, loaded once, its row
# statistics taken from the registers: one round trip to memory instead of three; BM x BK <= 8192 keeps the float32
# x tile in registers); at most BM_MAX rows per program.
CONFIG = {"BN": 64, "BN_SMALL": 32, "small": 4096, "BK": 256, "BM_MAX": 64, "warps": 4}
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _dot(x, w, CDT: tl.constexpr, UPCAST: tl.constexpr):
    """x @ w with both rounded to CDT, float32 accumulator."""
    if CDT == tl.float32 or UPCAST:
        y = tl.dot(x.to(CDT).to(tl.float32), w.to(CDT).to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(x.to(CDT), w.to(CDT))
    return y


@triton.jit
def _normed(x, rk, mk, mean, rstd, LW, LB):
    lw = tl.load(LW + rk, mask=mk, other=0.0).to(tl.float32)
    lb = tl.load(LB + rk, mask=mk, other=0.0).to(tl.float32)
    return (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]


@triton.jit
def _ln_linear_kernel(X, W, Bias, LW, LB, R, Y, M, N, K, eps, sxm, swn, srm, sym,
                      HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
                      CDT: tl.constexpr, UPCAST: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr,
                      PREFETCH: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    X += rm.to(tl.int64)[:, None] * sxm
    W += rn[None, :].to(tl.int64) * swn
    if ONE_TILE:
        rk = tl.arange(0, BK)
        mk = rk < K
        m2 = mm[:, None] & mk[None, :]
        if not PREFETCH:
            wait_previous(PDL)
        w = tl.load(W + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        if PREFETCH:  # the weights were loaded while the previous kernel finished (pdl.py)
            wait_previous(PDL)
        x = tl.load(X + rk[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_LN:
            mean = tl.sum(x, 1) / K
            d = tl.where(m2, x - mean[:, None], 0.0)
            x = _normed(x, rk, mk, mean, 1.0 / tl.sqrt(tl.sum(d * d, 1) / K + eps), LW, LB)
        acc = _dot(x, w, CDT, UPCAST)
    else:
        wait_previous(PDL)
        if HAS_LN:  # row mean and variance first: two passes over K
            s = tl.zeros([BM], tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                s += tl.sum(tl.load(X + rk[None, :], mask=mm[:, None] & (rk < K)[None, :], other=0.0)
                            .to(tl.float32), 1)
            mean = s / K
            s = tl.zeros([BM], tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                m2 = mm[:, None] & (rk < K)[None, :]
                d = tl.where(m2, tl.load(X + rk[None, :], mask=m2, other=0.0).to(tl.float32) - mean[:, None], 0.0)
                s += tl.sum(d * d, 1)
            rstd = 1.0 / tl.sqrt(s / K + eps)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            x = tl.load(X + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
            if HAS_LN:
                x = _normed(x, rk, mk, mean, rstd, LW, LB)
            acc += _dot(x, tl.load(W + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0), CDT, UPCAST)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=mn, other=0.0).to(CDT).to(tl.float32)[None, :]
    y = acc.to(CDT).to(tl.float32)  # rounded as F.linear's output; relu and the sum on its exact float32 value
    if RELU:
        y = tl.maximum(y, 0.0)
    m2 = mm[:, None] & mn[None, :]
    if HAS_RES:
        y += tl.load(R + rm.to(tl.int64)[:, None] * srm + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(Y + rm.to(tl.int64)[:, None] * sym + rn[None, :], y.to(Y.dtype.element_ty), mask=m2)


def launch(x, weight, bias, ln, relu, residual, out, cdt, prefetch=False):
    """x (M, K), weight (N, K), bias (N,) or None, ln (weight, bias, eps) or None, residual and out (M, N); every
    last stride 1. Writes out and returns it."""
    M, K = x.shape
    N = weight.shape[0]
    cfg = CONFIG
    BM = min(cfg["BM_MAX"], max(16, triton.next_power_of_2(M)))
    BN = cfg["BN_SMALL"] if N * triton.cdiv(M, BM) <= cfg["small"] else cfg["BN"]
    BK = min(cfg["BK"], 8192 // BM, max(16, triton.next_power_of_2(K)))  # an x tile of <= 8192 floats
    lw, lb, eps = ln if ln is not None else (x, x, 0.0)
    res = residual if residual is not None else out
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    _ln_linear_kernel[grid](x, weight, bias if bias is not None else weight, lw, lb, res, out, M, N, K, eps,
                            x.stride(0), weight.stride(0), res.stride(0), out.stride(0),
                            HAS_LN=ln is not None, HAS_BIAS=bias is not None, RELU=relu,
                            HAS_RES=residual is not None, CDT=_TL[cdt],
                            UPCAST=not x.is_cuda, ONE_TILE=K <= BK, PDL=pdl(x), PREFETCH=prefetch, BM=BM, BN=BN, BK=BK,
                            num_warps=cfg["warps"], **launch_options(x))
    return out
