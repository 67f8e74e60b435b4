"""Linear attention through the chunked Triton kernels (kernels/linear_attn/chunk.py), as custom ops with autograd.

``attnlab::linear_attn_fwd`` / ``attnlab::linear_attn_bwd`` are ``torch.library`` custom ops with fake (meta)
implementations and a registered autograd formula, so ``torch.compile`` traces through the model without a graph
break and CUDA graphs can capture them (the launchers allocate only through torch and never sync). Eager calls take
the same functions through a plain autograd.Function, which costs less host time (``kernels.eager_or_compiled``)."""
from __future__ import annotations

import torch

from .. import eager_or_compiled
from .chunk import chunk_bwd, chunk_fwd, fwd_runs
from .feature import elu1_features
from .reference import linear_attention_chunked_torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _none(t):
    return None if t.numel() == 0 else t


def _mapped(q, elu1):
    """Whether q and k reach the kernels as features mapped once by feature.py: elu + 1 with bfloat16 or float32
    inputs. float16 keeps the map inside the kernels, whose float32 features hold exp(x) below float16's range."""
    return elu1 and q.dtype != torch.float16


def _linear_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                    eps: float, elu1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    """(o, r, S0, z0, qf, kf): see chunk_fwd; qf, kf the features phi(q), phi(k) when mapped before the kernels
    (_mapped; the backward takes them in place of q, k), else empty; a missing S0 / z0 is an empty tensor (custom
    ops return tensors only)."""
    mapped = _mapped(q, elu1)
    qf, kf = (elu1_features(q), elu1_features(k)) if mapped else (q.new_empty(0), k.new_empty(0))
    o, r, S0, z0 = chunk_fwd(qf if mapped else q, kf if mapped else k, v, causal=causal, elu1=elu1 and not mapped,
                             norm=True, eps=eps, mask=mask)
    if S0 is None:
        S0, z0 = r.new_empty(0), r.new_empty(0)
    return o, r, S0, z0, qf, kf


linear_attn_fwd = torch.library.custom_op("attnlab::linear_attn_fwd", _linear_attn_fwd, mutates_args=())


@linear_attn_fwd.register_fake
def _(q, k, v, mask, causal, eps, elu1):
    B, H, T, DK = q.shape
    DV = v.shape[3]
    o = q.new_empty(B, T, H, DV).transpose(1, 2)  # chunk_fwd's layout: merge_heads is free
    r = q.new_empty(B * H, T, dtype=torch.float32)
    n, sdt = fwd_runs(q, k, v, causal)
    qf, kf = (torch.empty_like(q), torch.empty_like(k)) if _mapped(q, elu1) else (q.new_empty(0), k.new_empty(0))
    if n == 0:
        return o, r, r.new_empty(0), r.new_empty(0), qf, kf
    return o, r, r.new_empty(n, B * H, DK, DV, dtype=sdt), r.new_empty(n, B * H, DK), qf, kf


def _linear_attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                    r: torch.Tensor, S0: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                    feature: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """feature: chunk_bwd's elu1 (2: q, k are the features qf, kf the forward mapped)."""
    dq, dk, dv = chunk_bwd(q, k, v, o, do, r, _none(S0), _none(z0), causal=causal, elu1=feature, norm=True,
                           mask=mask)
    return _layout_of(q, dq), _layout_of(k, dk), _layout_of(v, dv)


def _layout_of(x, g):
    """g in the layout torch.empty_like(x) has, which the fake implementation promises. The kernels write straight
    into that layout (for split_heads' (B, T, H, d) views too, so their projections' backward needs no copy); only
    summed dv-tile partials or a stride fix-up are copied here. (.contiguous() cost the model two copies per grad.)"""
    if g.stride() == x.stride():
        return g
    out = torch.empty_like(x)
    return g if g.stride() == out.stride() else out.copy_(g)


linear_attn_bwd = torch.library.custom_op("attnlab::linear_attn_bwd", _linear_attn_bwd, mutates_args=())


@linear_attn_bwd.register_fake
def _(q, k, v, o, do, r, S0, z0, mask, causal, feature):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, mask, causal, eps, elu1 = inputs
    o, r, S0, z0, qf, kf = output
    # saved: q and k (or their features, as large), v, the output, r = 1/(den+eps) (T floats per head) and the run
    # start states (d x dv per head and run); the backward recomputes scores and the causal scan states
    mapped = _mapped(q, elu1)
    ctx.save_for_backward(qf if mapped else q, kf if mapped else k, v, o, r, S0, z0, mask)
    ctx.causal, ctx.feature = causal, 2 if mapped else int(elu1)


def _backward(bwd):
    """The backward formula, through ``bwd``: the custom op in compiled graphs, its body in eager mode."""
    def backward(ctx, do, dr, dS0, dz0, dqf, dkf):
        q, k, v, o, r, S0, z0, mask = ctx.saved_tensors
        dq, dk, dv = bwd(q, k, v, o, do, r, S0, z0, mask, ctx.causal, ctx.feature)
        return dq, dk, dv, None, None, None, None
    return backward


linear_attn_fwd.register_autograd(_backward(linear_attn_bwd), setup_context=_setup)
_linear_attn = eager_or_compiled(linear_attn_fwd, _linear_attn_fwd, _setup, _backward(_linear_attn_bwd))


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
    return _linear_attn(q, k, v, key_padding_mask, bool(causal), float(eps), feature_map == "elu1")[0]
