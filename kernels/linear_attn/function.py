"""Linear attention through the chunked Triton kernels (kernels/linear_attn/chunk.py), with autograd."""
from __future__ import annotations

import torch

from .chunk import chunk_bwd, chunk_fwd
from .reference import linear_attention_chunked_torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LinearAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, eps, elu1):
        o, r, S0, z0 = chunk_fwd(q, k, v, causal=causal, elu1=elu1, norm=True, eps=eps, mask=mask)
        # saved: inputs, output, r = 1/(den+eps) (T floats per head) and the bidirectional state (d x dv per head);
        # the backward recomputes features, scores and the causal scan states
        ctx.save_for_backward(q, k, v, o, r, S0, z0, mask)
        ctx.causal, ctx.elu1 = causal, elu1
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, r, S0, z0, mask = ctx.saved_tensors
        dq, dk, dv = chunk_bwd(q, k, v, o, do, r, S0, z0, causal=ctx.causal, elu1=ctx.elu1, norm=True, mask=mask)
        return dq, dk, dv, None, None, None, None


def check_qkv(q, k, v, causal, key_padding_mask, name="linear_attention_triton"):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: expected q, k (B, H, T, d) and v (B, H, S, dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(need k (B, H, S, d) and v (B, H, S, dv))")
    if causal and k.shape[2] != T:
        raise ValueError(f"{name}: causal attention needs as many keys as queries; got T={T}, S={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] == 0 or T == 0:
        raise ValueError(f"{name}: empty sequence (T={T}, S={k.shape[2]})")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, k.shape[2])):
        raise ValueError(f"{name}: key_padding_mask must be bool of shape (B, S) = {(B, k.shape[2])}, True at "
                         f"padding; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def linear_attention_triton(q, k, v, causal: bool = True, eps: float = 1e-6, feature_map: str | None = "elu1",
                            key_padding_mask=None):
    """Same function as ``linear_attention_ref``: q, k (B, H, T, d), v (B, H, S, dv) -> (B, H, T, dv) in q's dtype.

    float64 runs the chunked PyTorch form instead (Triton has no fast fp64 matrix product)."""
    if feature_map not in ("elu1", None):
        raise ValueError(f"unknown feature map {feature_map!r}; expected 'elu1' or None (inputs already mapped)")
    check_qkv(q, k, v, causal, key_padding_mask)
    if q.dtype == torch.float64:
        return linear_attention_chunked_torch(q, k, v, causal, eps, feature_map, key_padding_mask)
    if q.dtype not in DTYPES:
        raise TypeError(f"linear_attention_triton: dtype {q.dtype} is not supported; use float32, bfloat16 or float16")
    return LinearAttentionFn.apply(q, k, v, key_padding_mask, bool(causal), float(eps), feature_map == "elu1")
