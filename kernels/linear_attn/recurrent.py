"""One decoding step of linear attention (and MemSizer) in one Triton launch: state update plus read-out.

    S' = S + phi(k) v^T,   z' = z + phi(k),   y = phi(q)^T S' / (phi(q)^T z' + eps)        (NORM)
    S' = S + a v^T,        c' = c + 1,         y = p^T S' / sqrt(max(c', 1))                (MemSizer: count mode)

Rows with write=False keep their state (their output is still computed). One program per (batch, head) owns the
whole d x dv state of that head, looping over dv-tiles, so writing S and z in place is race-free: the in-place
form (``linear_attention_step_``) allocates nothing and syncs nothing, so it can be captured in a CUDA graph.
No autograd: this is the decoding path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pdl import launch_options, pdl, wait_previous


@triton.jit
def _step_kernel(Q, K, V, S, Z, SO, ZO, Y, W, H, eps,
                 sqb, sqh, skb, skh, svb, svh, ssb, ssh, ssk, szb, szh, sob, soh, sok, szob, szoh, syb, syh,
                 DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 ELU1: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, PDL: tl.constexpr):
    wait_previous(PDL)
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    ck = tl.arange(0, BK)
    mk = ck < DK
    q = tl.load(Q + b * sqb + h * sqh + ck, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(K + b * skb + h * skh + ck, mask=mk, other=0.0).to(tl.float32)
    if ELU1:
        q = tl.where(mk, tl.where(q > 0, q + 1.0, tl.exp(q)), 0.0)
        k = tl.where(mk, tl.where(k > 0, k + 1.0, tl.exp(k)), 0.0)
    w = 1.0
    if HAS_W:
        w = (tl.load(W + b) != 0).to(tl.float32)
    k = k * w
    if NORM:  # z' = z + k, y = num / (q . z' + eps)
        z = tl.load(Z + b * szb + h * szh + ck, mask=mk, other=0.0).to(tl.float32) + k
        tl.store(ZO + b * szob + h * szoh + ck, z.to(ZO.dtype.element_ty), mask=mk)
        scale = 1.0 / (tl.sum(q * z, 0) + eps)
    else:  # count mode: Z, ZO hold one count per batch row
        c = tl.load(Z + b * szb).to(tl.float32) + w
        tl.store(ZO + b * szob, c.to(ZO.dtype.element_ty))
        scale = 1.0 / tl.sqrt(tl.maximum(c, 1.0))
    S += b.to(tl.int64) * ssb + h * ssh
    SO += b.to(tl.int64) * sob + h * soh
    for v0 in range(0, DV, BV):
        cv = v0 + tl.arange(0, BV)
        mv = cv < DV
        v = tl.load(V + b * svb + h * svh + cv, mask=mv, other=0.0).to(tl.float32)
        m2 = mk[:, None] & mv[None, :]
        st = tl.load(S + ck[:, None] * ssk + cv[None, :], mask=m2, other=0.0).to(tl.float32)
        st += k[:, None] * v[None, :]
        tl.store(SO + ck[:, None] * sok + cv[None, :], st.to(SO.dtype.element_ty), mask=m2)
        y = tl.sum(q[:, None] * st, 0) * scale
        tl.store(Y + b * syb + h * syh + cv, y.to(Y.dtype.element_ty), mask=mv)


def _last_unit(*ts):
    for t in ts:
        if t.stride(-1) != 1:
            raise ValueError("step kernel: tensors need a unit last stride (call .contiguous()) for in-place use")


def launch_step(q, k, v, S, Z, S_out, Z_out, out, write, eps, elu1, norm):
    """q, k (B, H, d); v, out (B, H, dv); S, S_out (B, H, d, dv); Z, Z_out (B, H, d) if norm else (B,) counts."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, S, Z)):
        raise RuntimeError("the Triton decode step has no autograd; run it under torch.no_grad() or use "
                           "backend='torch'")
    _last_unit(q, k, v, S, S_out, out)
    B, H, DK = q.shape
    DV = v.shape[-1]
    if DK > 256:
        raise ValueError(f"step kernel: d={DK} > 256 is not supported; use backend='torch'")
    BK = max(16, triton.next_power_of_2(DK))
    BV = max(16, min(triton.next_power_of_2(DV), max(16, 4096 // BK)))  # S tile of at most 4096 numbers
    if norm:
        _last_unit(Z, Z_out)
        zs, zos = Z.stride()[:2], Z_out.stride()[:2]
    else:
        zs, zos = (Z.stride(0), 0), (Z_out.stride(0), 0)
    W = write.view(torch.uint8) if write is not None else q
    _step_kernel[(B * H,)](q, k, v, S, Z, S_out, Z_out, out, W, H, eps, *q.stride()[:2], *k.stride()[:2],
                           *v.stride()[:2], *S.stride()[:3], *zs, *S_out.stride()[:3], *zos, *out.stride()[:2],
                           DK=DK, DV=DV, BK=BK, BV=BV, ELU1=elu1, NORM=norm, HAS_W=write is not None,
                           PDL=pdl(q), num_warps=4 if BK * BV >= 2048 else 2, **launch_options(q))
    return out


def _check(q, k, v, S, z, feature_map, write):
    if feature_map not in ("elu1", None):
        raise ValueError(f"unknown feature map {feature_map!r}; expected 'elu1' or None (inputs already mapped)")
    B, H, d = q.shape
    if k.shape != q.shape or v.shape[:2] != (B, H) or S.shape != (B, H, d, v.shape[-1]) or z.shape != (B, H, d):
        raise ValueError(f"linear_attention_step: expected q, k (B, H, d), v (B, H, dv), S (B, H, d, dv), z (B, H, d);"
                         f" got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(S.shape)}, "
                         f"{tuple(z.shape)}")
    if write is not None and (write.dtype != torch.bool or tuple(write.shape) != (B,)):
        raise ValueError(f"write must be a bool tensor of shape (B,) = ({B},); got {write.dtype} {tuple(write.shape)}")
    if torch.float64 in (q.dtype, S.dtype):
        raise TypeError("the Triton decode step has no float64 path; use backend='torch' for float64")


def linear_attention_step_(q, k, v, S, z, out, eps: float = 1e-6, feature_map: str | None = "elu1", write=None):
    """In place and CUDA-graph safe: S and z are updated, out (B, H, dv) receives y. Returns out."""
    _check(q, k, v, S, z, feature_map, write)
    return launch_step(q, k, v, S, z, S, z, out, write, eps, feature_map == "elu1", True)


def linear_attention_step_triton(q, k, v, S, z, eps: float = 1e-6, feature_map: str | None = "elu1", write=None):
    """Same as ``linear_attention_step_ref``: returns (y, S', z') and leaves S, z untouched."""
    _check(q, k, v, S, z, feature_map, write)
    sdt = torch.promote_types(S.dtype, torch.promote_types(k.dtype, v.dtype))
    zdt = torch.promote_types(z.dtype, k.dtype)
    ydt = torch.promote_types(q.dtype, torch.promote_types(sdt, zdt))
    S_out = torch.empty(S.shape, device=S.device, dtype=sdt)
    z_out = torch.empty(z.shape, device=z.device, dtype=zdt)
    y = torch.empty(v.shape, device=v.device, dtype=ydt)
    S, z = (S if S.stride(-1) == 1 else S.contiguous()), (z if z.stride(-1) == 1 else z.contiguous())
    launch_step(q if q.stride(-1) == 1 else q.contiguous(), k if k.stride(-1) == 1 else k.contiguous(),
                v if v.stride(-1) == 1 else v.contiguous(), S, z, S_out, z_out, y, write, eps,
                feature_map == "elu1", True)
    return y, S_out, z_out
