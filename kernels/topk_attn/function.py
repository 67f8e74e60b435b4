"""The fused Triton top-k attention kernels as custom ops with autograd, two algorithms for one function:

* threshold.py: per query row a threshold found by counting sweeps, then flash-attention-style masked forward
  and backward on the tensor cores. Saved for backward: q, k, v, the output and three numbers per row. From
  threshold.CONFIG["sparse_bwd_T"] rows (when a gradient is taken, and not under deterministic algorithms:
  takes_sparse_bwd) the forward also finds each row's k key indices and chunk.py's sparse backward runs.
* chunk.py (the sparse kernels): per row the top-k softmax weights P (float32) and key indices I (int32),
  O(T * k); the backward gathers the k keys and scatters into dK, dV with float32 atomics.

Which one runs (measured on an H200, kernels/topk_attn/NOTES.md, sessions 9 to 12): the threshold kernels up to
THRESHOLD_MAX_T query rows (fwd+bwd at B8 H16 d64 k64: 5.8 ms against 17.6 for the sparse ones at T = 4096, 81
against 98 at 16384, but 381 against 269 at 32768 in session 9, where the sparse backward's O(T k) gathers beat
the dense masked one: the reason for the sparse backward behind the threshold forward, 71 ms at 16384) and head
dims up to THRESHOLD_MAX_D (the widths checked on the GPU; wider heads take the sparse kernels, whose tiles are
fitted to the device's shared memory).
"""
from __future__ import annotations

import torch

from .. import eager_or_compiled
from ..fit import smem_limit
from .chunk import MAX_TOPK, topk_bwd, topk_fwd
from . import threshold
from .threshold import empty_out, heads_layout, threshold_bwd, threshold_fwd
from .reference import check_args

THRESHOLD_MAX_T = 32768
THRESHOLD_MAX_D = 64
# Shared memory the threshold kernels may ask for at d = 64 with the default CONFIG and aligned shapes (the JIT's
# variant with pipelined copies): 198656 bytes, session 11's dk/dv kernel as Triton 3.6 compiled it on the H200
# (bench/check_topk_gpu.py logs each kernel's; Triton 3.9 offline, sm_90a: 196608, the dq kernel on float32 inputs,
# 2 stages: threshold._stages). Session 13's bf16 kernels ask for at most 81920 on the H200; the guard stays until
# the float32 and index-finding variants are measured there too (kernels/topk_attn/NOTES.md, session 13). Their
# tiles are not fitted to the device (kernels/fit.py fits the sparse ones), so a GPU with less (an A100: 166912)
# takes the sparse kernels. test_compiles_for_hopper checks that this covers every threshold kernel a call launches.
THRESHOLD_SMEM = 198656


def takes_threshold(T: int, d: int, dv: int, device=None) -> bool:
    """Whether a call with T query rows and head dims d, dv on ``device`` runs the threshold kernels
    (threshold.py)."""
    return T <= THRESHOLD_MAX_T and max(d, dv) <= THRESHOLD_MAX_D and smem_limit(device) >= THRESHOLD_SMEM


def _topk_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                  topk: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, P, I): see topk_fwd. A torch.library custom op with a fake implementation and autograd, so
    torch.compile traces through it and CUDA graphs capture it (as the linear-attention ops)."""
    return topk_fwd(q, k, v, topk, causal, key_padding_mask, scale)


topk_attn_fwd = torch.library.custom_op("attnlab::topk_attn_fwd", _topk_attn_fwd, mutates_args=())


@topk_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, topk, causal, scale):
    B, H, T, _ = q.shape
    return (q.new_empty(B, H, T, v.shape[3]), q.new_empty(B, H, T, topk, dtype=torch.float32),
            q.new_empty(B, H, T, topk, dtype=torch.int32))


def _topk_attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                  P: torch.Tensor, I: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return topk_bwd(q, k, v, out, dout, P, I, scale)


topk_attn_bwd = torch.library.custom_op("attnlab::topk_attn_bwd", _topk_attn_bwd, mutates_args=())


@topk_attn_bwd.register_fake
def _(q, k, v, out, dout, P, I, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, _, _, _, scale = inputs
    out, P, I = output
    ctx.save_for_backward(q, k, v, out, P, I)
    ctx.scale = scale


def _backward(bwd):
    def backward(ctx, dout, dP, dI):
        q, k, v, out, P, I = ctx.saved_tensors
        dq, dk, dv = bwd(q, k, v, out, dout, P, I, ctx.scale)
        return dq, dk, dv, None, None, None, None
    return backward


topk_attn_fwd.register_autograd(_backward(topk_attn_bwd), setup_context=_setup)
_topk_attn = eager_or_compiled(topk_attn_fwd, _topk_attn_fwd, _setup, _backward(_topk_attn_bwd))


def _topk_threshold_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                        topk: int, causal: bool, scale: float, sparse_bwd: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, t, tj, I): see threshold.threshold_fwd (I empty unless sparse_bwd)."""
    return threshold_fwd(q, k, v, topk, causal, key_padding_mask, scale, indices=sparse_bwd)


topk_threshold_fwd = torch.library.custom_op("attnlab::topk_threshold_fwd", _topk_threshold_fwd, mutates_args=())


@topk_threshold_fwd.register_fake
def _(q, k, v, key_padding_mask, topk, causal, scale, sparse_bwd):
    B, H, T, _ = q.shape
    row = q.new_empty(B, H, T, dtype=torch.float32)
    return (empty_out(q, v.shape[3]), row, torch.empty_like(row), row.new_empty(B, H, T, dtype=torch.int32),
            row.new_empty(B, H, T if sparse_bwd else 0, topk, dtype=torch.int32))


def _topk_threshold_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                        lse: torch.Tensor, t: torch.Tensor, tj: torch.Tensor, key_padding_mask: torch.Tensor | None,
                        causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return threshold_bwd(q, k, v, out, dout, lse, t, tj, causal, key_padding_mask, scale)


topk_threshold_bwd = torch.library.custom_op("attnlab::topk_threshold_bwd", _topk_threshold_bwd, mutates_args=())


@topk_threshold_bwd.register_fake
def _(q, k, v, out, dout, lse, t, tj, key_padding_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _threshold_setup(ctx, inputs, output):
    q, k, v, kpm, _, causal, scale, sparse_bwd = inputs
    out, lse, t, tj, I = output
    ctx.save_for_backward(q, k, v, out, lse, t, tj, kpm, I)
    ctx.causal, ctx.scale, ctx.sparse_bwd = causal, scale, sparse_bwd


def _threshold_backward(bwd, sparse_bwd):
    def backward(ctx, dout, *_):
        q, k, v, out, lse, t, tj, kpm, I = ctx.saved_tensors
        if ctx.sparse_bwd:  # the weights from the log-sum-exp (chunk.topk_bwd)
            dq, dk, dv = sparse_bwd(q, k, v, out, dout, lse, I, ctx.scale)
        else:
            dq, dk, dv = bwd(q, k, v, out, dout, lse, t, tj, kpm, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None
    return backward


topk_threshold_fwd.register_autograd(_threshold_backward(topk_threshold_bwd, topk_attn_bwd),
                                     setup_context=_threshold_setup)
_topk_threshold = eager_or_compiled(topk_threshold_fwd, _topk_threshold_fwd, _threshold_setup,
                                    _threshold_backward(_topk_threshold_bwd, _topk_attn_bwd))


def takes_sparse_bwd(T: int, *inputs) -> bool:
    """Whether the threshold forward also finds each row's key indices for the sparse backward (chunk.topk_bwd): from
    threshold.CONFIG["sparse_bwd_T"] query rows, when a gradient will be taken, and not under
    torch.use_deterministic_algorithms (it adds dK, dV with float32 atomics; the dense masked backward is
    deterministic)."""
    return (T >= threshold.CONFIG["sparse_bwd_T"] and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
            and not torch.are_deterministic_algorithms_enabled())


def topk_attention_triton(q, k, v, topk: int, causal: bool, key_padding_mask=None, chunk_size: int = 1024,
                          scale=None):
    """Top-k attention, fused: same function as ``reference.topk_attention_dense``. ``chunk_size`` is accepted
    for signature parity with the chunked PyTorch version and ignored (the kernel tiles queries itself).
    fp32 / bf16 / fp16 inputs, float32 accumulation; supports min(topk, key length) <= MAX_TOPK (128)."""
    check_args(q, k, v, topk, key_padding_mask, chunk_size)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"topk_attention_triton: dtype {q.dtype} is not supported; use float32, bfloat16 or "
                         f"float16, or backend='torch'")
    S = k.shape[2]
    kk = min(topk, S)
    if kk > MAX_TOPK:
        raise ValueError(f"topk_attention_triton: topk={topk} > {MAX_TOPK} (with key length {S}) is not supported "
                         f"by the fused kernel; use backend='torch' (the chunked PyTorch version)")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"topk_attention_triton: head dims up to 256 are supported, got q/k {q.shape[-1]}, "
                         f"v {v.shape[-1]}; use backend='torch'")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"topk_attention_triton: scale must be > 0 (the kernel selects on raw dot products), "
                         f"got {scale}; use backend='torch' for other scales")
    if q.shape[2] == 0 or S == 0:  # nothing to attend: zeros, still connected to the graph
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
    if takes_threshold(q.shape[2], q.shape[-1], v.shape[-1], q.device):  # the model's split heads need no copy
        return _topk_threshold(heads_layout(q), heads_layout(k), heads_layout(v), key_padding_mask, kk, causal,
                               scale, takes_sparse_bwd(q.shape[2], q, k, v))[0]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _topk_attn(q, k, v, key_padding_mask, kk, causal, scale)[0]
