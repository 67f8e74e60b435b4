"""Top-k attention (Gupta et al., 2021, "Memory-efficient Transformers via Top-k Attention") in plain PyTorch:
the reference every kernel is tested against.

Each query keeps only the ``topk`` largest scores s_ij = scale * q_i . k_j among the keys it may see, and the
softmax runs over those:

    y_i = sum_{j in top_k(i)} softmax_j(s_ij) v_j

Masked scores (causal, key padding) are -inf and never enter the softmax: a row with fewer than ``topk`` visible
keys keeps all of them, a row with none outputs 0. With topk >= key length this is exactly softmax attention.

Shapes: q (B, H, T, d); k (B, H, S, d); v (B, H, S, dv); key_padding_mask (B, S) bool, True = ignore. When causal,
query i sits at key position i + (S - T), so one query against a KV cache of length S sees all S keys.
"""
from __future__ import annotations

import torch


def check_args(q, k, v, topk, key_padding_mask, chunk_size=1):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"topk_attention: q, k, v must be (batch, heads, len, dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"topk_attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; expected q (B,H,T,d), k (B,H,S,d), v (B,H,S,dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"topk_attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk_attention: topk must be a positive int (the number of kept keys); got {topk!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"topk_attention: chunk_size must be a positive int (queries per chunk); got {chunk_size!r}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"topk_attention: key_padding_mask must be a bool tensor of shape (batch, key_len) = "
                         f"{(k.shape[0], k.shape[2])} with True at padding; got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")


def visible(key_padding_mask, t0: int, t1: int, T: int, S: int, causal: bool, device):
    """Bool 'may attend' mask (B or 1, 1, t1 - t0, S) for queries t0..t1-1, or None when nothing is masked."""
    allowed = None
    if causal:
        pos = torch.arange(t0, t1, device=device)[:, None] + (S - T)
        allowed = (torch.arange(S, device=device)[None, :] <= pos)[None, None]
    if key_padding_mask is not None:
        real = ~key_padding_mask[:, None, None, :]
        allowed = real if allowed is None else allowed & real
    return allowed


def topk_attention_dense(q, k, v, topk: int, causal: bool, key_padding_mask=None, scale=None):
    """The definition, on the full (T, S) score matrix: O(T*S) memory, plain autograd. No dropout."""
    check_args(q, k, v, topk, key_padding_mask)
    T, S = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q * scale) @ k.transpose(-1, -2)
    allowed = visible(key_padding_mask, 0, T, T, S, causal, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    idx = s.topk(min(topk, S), dim=-1).indices
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True) & ~s.isneginf()
    return attention_over(s, keep, v)


def threshold_keep(s, t, tj, rtol=1e-6):
    """The keys that per-row thresholds (t, tj) of the threshold kernels (threshold.py) select, read off float64
    scores s (B, H, T, S); t, tj (B, H, T). s > t; where a row split a tie (tj > 0), also the tied keys with an
    index below tj (tied: within rtol of t, since the kernel's float32 tie is the float64 tie of identical keys)."""
    t = t[..., None].double()
    near = ((s - t).abs() <= rtol * t.abs().clamp_min(1)) & (tj[..., None] > 0)
    return (s > t) & ~near | near & (torch.arange(s.shape[-1], device=s.device) < tj[..., None])


def attention_over(s, keep, v):
    """softmax(s) over the keys where ``keep`` (bool, broadcastable to s), times v; a row keeping nothing gives 0.
    s: scaled scores (B, H, T, S). Also the reference for a given selection (a kernel's choice among ties)."""
    # rows with nothing kept get finite dummy scores so the softmax (and its gradient) stays NaN-free; zeroed below
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~keep.any(-1, keepdim=True), 0.0)
    p = torch.softmax(s, -1).masked_fill(~keep, 0.0)
    return p @ v


class TopkAttentionFunction(torch.autograd.Function):
    """Queries in chunks of ``chunk_size``; only one (B, H, chunk, S) score block is alive at a time, in forward
    and in backward. Saved for backward: q, k, v and, per query, the top-k probabilities, their key indices
    (int32) and the dropout keep-mask: O(T*k) instead of the O(T*S) attention matrix. Backward recomputes
    dO @ V^T chunk by chunk (as the authors do) and needs no second top-k."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, topk, causal, chunk_size, dropout_p, scale, save):
        B, H, T, _ = q.shape
        S = k.shape[2]
        kk = min(topk, S)
        pdtype = torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32 even for fp16/bf16 inputs
        out = q.new_empty(B, H, T, v.shape[-1])
        P = torch.empty(B, H, T, kk, dtype=pdtype, device=q.device) if save else None
        I = torch.empty(B, H, T, kk, dtype=torch.int32, device=q.device) if save else None
        keep = torch.empty(B, H, T, kk, dtype=torch.bool, device=q.device) if save and dropout_p > 0 else None
        for t0 in range(0, T, chunk_size):
            t1 = min(t0 + chunk_size, T)
            s = (q[:, :, t0:t1] * scale) @ k.transpose(-1, -2)             # (B, H, C, S)
            allowed = visible(key_padding_mask, t0, t1, T, S, causal, q.device)
            if allowed is not None:
                s.masked_fill_(~allowed, float("-inf"))
            top, idx = s.topk(kk, dim=-1, sorted=False)
            # -inf entries are picked only when a row has fewer than kk visible keys: they get weight 0
            # (a row of all -inf is NaN after softmax and becomes all 0 here)
            p = torch.softmax(top.to(pdtype), -1).masked_fill_(top.isneginf(), 0.0)
            if save:
                P[:, :, t0:t1], I[:, :, t0:t1] = p, idx
            if dropout_p > 0:
                m = torch.rand_like(p) >= dropout_p
                if save:
                    keep[:, :, t0:t1] = m
                p = p * m / (1.0 - dropout_p)
            # scatter back into the (now free) score block and multiply densely, like the authors' code
            out[:, :, t0:t1] = s.zero_().scatter_(-1, idx, p.to(s.dtype)) @ v
        if save:
            ctx.save_for_backward(q, k, v, P, I, keep)
            ctx.chunk_size, ctx.dropout_p, ctx.scale = chunk_size, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, P, I, keep = ctx.saved_tensors
        if P is None:
            raise RuntimeError("topk_attention: the forward ran without grad; run it with grad enabled")
        C, dp_rate, scale = ctx.chunk_size, ctx.dropout_p, ctx.scale
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for t0 in range(0, q.shape[2], C):
            t1 = min(t0 + C, q.shape[2])
            p, idx, do = P[:, :, t0:t1], I[:, :, t0:t1].long(), dout[:, :, t0:t1]
            buf = do @ v.transpose(-1, -2)                                  # dA: (B, H, C, S)
            dp = buf.gather(-1, idx).to(p.dtype)
            pd = p
            if keep is not None:
                m = keep[:, :, t0:t1] / (1.0 - dp_rate)
                pd, dp = p * m, dp * m
            buf.zero_().scatter_(-1, idx, pd.to(buf.dtype))                 # A (after dropout)
            dv += buf.transpose(-1, -2) @ do
            ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale          # softmax backward; scale from q*scale
            buf.zero_().scatter_(-1, idx, ds.to(buf.dtype))                 # dScores
            dq[:, :, t0:t1] = buf @ k
            dk += buf.transpose(-1, -2) @ q[:, :, t0:t1]
        return dq, dk, dv, None, None, None, None, None, None, None


def topk_attention_chunked(q, k, v, topk: int, causal: bool, key_padding_mask=None, chunk_size: int = 1024,
                           dropout_p: float = 0.0, scale=None):
    """Memory-efficient top-k attention: peak memory O(chunk_size * S + T * topk) instead of O(T * S).
    ``dropout_p`` drops kept attention probabilities (callers pass 0 in eval)."""
    check_args(q, k, v, topk, key_padding_mask, chunk_size)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"topk_attention: dropout_p must be in [0, 1); got {dropout_p}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return TopkAttentionFunction.apply(q, k, v, key_padding_mask, topk, causal, chunk_size, dropout_p, scale, save)
