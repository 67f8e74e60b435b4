"""Reformer LSH attention (Kitaev et al., ICLR 2020), the baseline of "Transformers are RNNs" (LSH-1 / LSH-4).

Shared QK: each position has one vector q_i; its key is k_i = q_i / |q_i|. Each of ``n_hashes`` rounds hashes the keys
with a random rotation R (d x n_buckets/2): h(k) = argmax([kR, -kR]). Positions are sorted by (bucket, position),
cut into chunks of ``chunk_size``, and each query attends to the keys of its own bucket inside its chunk and the
previous chunk (and to earlier positions only, when causal). A query does not attend to itself unless nothing else
is available (its self logit is lowered by 5e4, which makes its weight exactly 0 whenever another key exists).
Padding is ignored and sorted last, so it never moves the chunk windows of real tokens. Rounds are combined by
their logsumexp, and a key sharing a bucket with a query in N rounds has its logit lowered by log N (as in the
paper, so that it is not counted N times): when every chunk window holds its queries' whole buckets the result is
exactly softmax attention over {j : j shares a bucket with i in at least one round} (``lsh_attention_reference``).

Cost: training O(T log T) for the sort + O(T * n_hashes * chunk_size * d) for the attention.
Decoding (``step``) is honest about what LSH buys at inference: it keeps a cache of all unit keys, values and their
bucket ids and attends to every cached key that shares a bucket with the query in some round -- O(t) per step and a
state that grows with t, like softmax attention. It is exactly ``lsh_attention_reference``; the parallel form
agrees with it when no bucket spills over the chunk window (e.g. ``chunk_size >= T``), not otherwise.

Hashing rotations: the buffer ``rotations`` (saved with the model) in eval; in training, fresh ones every forward
call when ``redraw`` is true (as in the paper), the buffer otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import Attention, ConfigError, State

SELF_PENALTY = 5e4  # finite so that fp16 logits stay finite; exp(-5e4) is exactly 0 in every float type


def lsh_buckets(kn: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """kn (B, H, T, d) unit keys, rotations (H, R, d, n_buckets/2) -> bucket ids (B, H, R, T)."""
    proj = torch.einsum("bhtd,hrdn->bhrtn", kn, rotations.to(kn.dtype))
    return torch.cat([proj, -proj], -1).argmax(-1)


def lsh_attention(q, kn, v, buckets, n_buckets: int, causal: bool, key_padding_mask=None, chunk_size: int = 32,
                  dropout: float = 0.0):
    """Chunked multi-round LSH attention. q, kn: (B, H, T, d); v: (B, H, T, dv); buckets: (B, H, R, T)."""
    B, H, T, d = q.shape
    R, dv = buckets.shape[2], v.shape[-1]
    C = min(chunk_size, T)
    Tp = T + (-T) % C
    N = Tp // C
    pad = torch.zeros(B, Tp, dtype=torch.bool, device=q.device)
    pad[:, T:] = True  # filler positions that make T a multiple of C: keys nobody sees, outputs dropped
    if key_padding_mask is not None:
        pad[:, :T] = key_padding_mask
    if Tp > T:
        q, kn, v = (F.pad(t, (0, 0, 0, Tp - T)) for t in (q, kn, v))
        buckets = F.pad(buckets, (0, Tp - T))
    pos = torch.arange(Tp, device=q.device)
    # padding sorts last, so that it never shifts the chunk windows of real tokens
    sort_bucket = buckets.masked_fill(pad[:, None, None, :], n_buckets)
    order = (sort_bucket * Tp + pos).argsort(-1)  # (B, H, R, Tp): by bucket, then by position

    def sort(t):  # (B, H, Tp, e) -> (B, H, R, N, C, e) in each round's sorted order
        e = t.shape[-1]
        return t.unsqueeze(2).expand(B, H, R, Tp, e).gather(3, order[..., None].expand(B, H, R, Tp, e)) \
            .view(B, H, R, N, C, e)

    def look_back(t, fill):  # (B, H, R, N, C, ...) -> (B, H, R, N, 2C, ...): previous chunk, then this one
        prev = torch.cat([torch.full_like(t[:, :, :, :1], fill), t[:, :, :, :-1]], 3)
        return torch.cat([prev, t], 4)

    sq, sk, sv = sort(q), sort(kn), sort(v)
    spos = order.view(B, H, R, N, C)  # original position of each sorted entry
    spad = pad[:, None, None, :].expand(B, H, R, Tp).gather(-1, order).view(B, H, R, N, C)
    kpos, kpad = look_back(spos, -1), look_back(spad, True)
    kk, kv = look_back(sk, 0.0), look_back(sv, 0.0)
    qb = buckets.gather(-1, order).view(B, H, R, N, C)  # this round's bucket of each sorted position
    kb = look_back(qb, -1)  # the dummy previous chunk of chunk 0 is in bucket -1: never matched
    same = qb[..., :, None] == kb[..., None, :]
    is_self = spos[..., :, None] == kpos[..., None, :]
    allowed = same & (~kpad[..., None, :] | is_self)
    if causal:
        allowed = allowed & (kpos[..., None, :] <= spos[..., :, None])
    s = (sq @ kk.transpose(-1, -2)) * d ** -0.5 - SELF_PENALTY * is_self.to(q.dtype)
    if R > 1:  # a key shared in n rounds would count n times: lower its logit by log n
        shared = torch.zeros_like(s)
        for r in range(R):  # round r's buckets, in every round's sorted order
            qb_r = buckets[:, :, r:r + 1].expand(B, H, R, Tp).gather(-1, order).view(B, H, R, N, C)
            shared += qb_r[..., :, None] == look_back(qb_r, -1)[..., None, :]
        s = s - shared.clamp_min(1).log()
    s = s.masked_fill(~allowed, float("-inf"))  # self is always allowed, so no row is empty
    lse = s.logsumexp(-1, keepdim=True)
    p = F.dropout((s - lse).exp(), dropout) if dropout > 0 else (s - lse).exp()
    o = torch.cat([p @ kv, lse], -1).view(B, H, R, Tp, dv + 1)
    undo = order.argsort(-1)
    o = o.gather(3, undo[..., None].expand(B, H, R, Tp, dv + 1))[:, :, :, :T]
    w = o[..., -1:].softmax(2)  # each round weighted by its share of the total probability mass
    return (w * o[..., :-1]).sum(2)


def lsh_attention_reference(q, kn, v, buckets, causal: bool, key_padding_mask=None):
    """Dense O(T^2) statement: softmax attention of query i over the keys j that share a bucket with it in at least
    one round (j <= i when causal, not padding), its own key only when nothing else is there."""
    T = q.shape[2]
    eye = torch.eye(T, dtype=torch.bool, device=q.device)
    allowed = (buckets[..., :, None] == buckets[..., None, :]).any(2)  # (B, H, T, T)
    if key_padding_mask is not None:
        allowed = allowed & (~key_padding_mask[:, None, None, :] | eye)
    if causal:
        allowed = allowed.tril()
    s = (q @ kn.transpose(-1, -2)) * q.shape[-1] ** -0.5 - SELF_PENALTY * eye.to(q.dtype)
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@register("reformer")
class ReformerAttention(Attention):
    roles = ("encoder", "decoder")  # shared QK: queries are their own keys, so there is no cross-attention form

    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, n_hashes: int = 1,
                 n_buckets: int = 16, chunk_size: int = 32, redraw: bool = True, bias: bool = True):
        super().__init__(d_model, n_heads, role, dropout)
        if n_buckets < 2 or n_buckets % 2:
            raise ConfigError(f"reformer: n_buckets={n_buckets} must be even and >= 2 (hash = argmax over "
                              f"[xR, -xR] with R of n_buckets/2 columns). Fix: e.g. `attention.n_buckets=16`.")
        if n_hashes < 1 or chunk_size < 1:
            raise ConfigError(f"reformer: n_hashes={n_hashes} and chunk_size={chunk_size} must be >= 1. "
                              f"Fix: e.g. `attention.n_hashes=4 attention.chunk_size=32`.")
        self.n_hashes, self.n_buckets, self.chunk_size, self.redraw = n_hashes, n_buckets, chunk_size, redraw
        self.qk_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.register_buffer("rotations", torch.randn(n_heads, n_hashes, self.head_dim, n_buckets // 2))

    def hash(self, kn: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        return lsh_buckets(kn, torch.randn_like(self.rotations) if fresh else self.rotations)

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        q, v = self.split_heads(self.qk_proj(x)), self.split_heads(self.v_proj(x))
        kn = F.normalize(q, dim=-1)
        buckets = self.hash(kn, fresh=self.training and self.redraw)
        y = lsh_attention(q, kn, v, buckets, self.n_buckets, self.causal, key_padding_mask, self.chunk_size,
                          self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(y))

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        if self.role != "decoder":
            raise ValueError("encoder self-attention is bidirectional and has no incremental form")
        p = self.qk_proj.weight
        H, d = self.n_heads, self.head_dim
        return State(kn=p.new_zeros(batch_size, H, 0, d), v=p.new_zeros(batch_size, H, 0, d),
                     buckets=torch.zeros(batch_size, H, 0, self.n_hashes, dtype=torch.long, device=p.device),
                     pad=torch.zeros(batch_size, 0, dtype=torch.bool, device=p.device), graph_step=False)

    def step(self, x, state, pad=None):
        q, v = self.split_heads(self.qk_proj(x)), self.split_heads(self.v_proj(x))  # (B, H, 1, d)
        kn = F.normalize(q, dim=-1)
        b = self.hash(kn).transpose(2, 3)  # (B, H, 1, R); always the saved rotations, as for the cached keys
        if pad is None:
            pad = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        state = State(kn=torch.cat([state["kn"], kn], 2), v=torch.cat([state["v"], v], 2),
                      buckets=torch.cat([state["buckets"], b], 2), pad=torch.cat([state["pad"], pad[:, None]], 1),
                      graph_step=False)  # a new shape every token: CUDA graphs leave the step eager
        t = state["kn"].shape[2]
        is_self = torch.arange(t, device=x.device) == t - 1
        # O(t): every cached key is checked for a shared bucket (the hash buys nothing over a KV cache here)
        allowed = (state["buckets"] == b).any(-1) & (~state["pad"][:, None, :] | is_self)  # (B, H, t)
        s = (q @ state["kn"].transpose(-1, -2))[:, :, 0] * self.head_dim ** -0.5 - SELF_PENALTY * is_self.to(q.dtype)
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = p.unsqueeze(-2) @ state["v"]  # (B, H, 1, d)
        return self.out_proj(self.merge_heads(y)), state

    def prefill(self, x, state, key_padding_mask=None):
        """A prompt at once, with exactly ``step``'s rule (dense over the cache, not the chunked parallel form,
        which agrees only when no bucket spills over its chunk window): the cache gains the prompt's unit keys,
        values, bucket ids and padding."""
        B, T, _ = x.shape
        q, v = self.split_heads(self.qk_proj(x)), self.split_heads(self.v_proj(x))  # (B, H, T, d)
        kn = F.normalize(q, dim=-1)
        b = self.hash(kn).transpose(2, 3)  # (B, H, T, R), the saved rotations as in step
        pad = key_padding_mask if key_padding_mask is not None else torch.zeros(B, T, dtype=torch.bool,
                                                                                device=x.device)
        n0 = state["kn"].shape[2]
        state = State(kn=torch.cat([state["kn"], kn], 2), v=torch.cat([state["v"], v], 2),
                      buckets=torch.cat([state["buckets"], b], 2), pad=torch.cat([state["pad"], pad], 1),
                      graph_step=False)
        kpos, qpos = torch.arange(n0 + T, device=x.device), torch.arange(n0, n0 + T, device=x.device)
        is_self = kpos[None, :] == qpos[:, None]  # (T, n0 + T)
        shared = (b[:, :, :, None, :] == state["buckets"][:, :, None, :, :]).any(-1)  # (B, H, T, n0 + T)
        allowed = shared & (~state["pad"][:, None, None, :] | is_self) & (kpos[None, :] <= qpos[:, None])
        s = (q @ state["kn"].transpose(-1, -2)) * self.head_dim ** -0.5 - SELF_PENALTY * is_self.to(q.dtype)
        y = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ state["v"]
        return self.out_proj(self.merge_heads(y)), state

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, "
                f"chunk_size={self.chunk_size}, redraw={self.redraw}")
