"""Softmax attention through PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU); decoding keeps a KV cache, so a step costs O(t) and the state grows with t.

The decoder's KV cache is preallocated: ``k``, ``v`` (B, H, capacity, d) and ``pad`` (B, capacity) (True at padding
tokens and at slots not written yet), with ``length`` (an int shared by all rows) counting the written positions. A
step writes one slot in place and reads the whole buffer under its mask -- no per-step ``torch.cat`` copying the
whole cache, and shapes that change only with the capacity, so CUDA graphs replay the step (decoding/graphs.py,
which hands ``length`` in as a device tensor). When full, the capacity doubles (from ``MIN_CAPACITY``);
``reserve_cache`` allocates up front, e.g. for the longest sequence a search can produce. Because writes are in
place, a state is consumed by ``step``: to branch (beam search), ``state.reorder(index)`` -- it copies."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import register
from .base import Attention, State


def sdpa_mask(key_padding_mask, T: int, S: int, causal: bool, device):
    """Boolean 'may attend' mask of shape (B or 1, 1, T, S) for SDPA, or None when nothing is masked.

    Rows with no allowed key (a padded query that sees only padding) are opened entirely so that softmax
    stays finite; their outputs belong to padding and are ignored downstream."""
    if key_padding_mask is None and not causal:
        return None
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(S - T)  # queries are the last T of S positions
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed


MIN_CAPACITY = 16
# Eager decoding steps keep cuDNN's SDPA out: it builds a plan per new shape (~60 ms per step seen on an H200, torch
# 2.11, cuDNN 9.19, when the key length grew by one each step), and eager searches still change shapes (beam search
# drops finished sentences from the batch; a full cache doubles); the memory-efficient kernel needs no plan.
STEP_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A step replayed from a CUDA graph has fixed shapes, so cuDNN would plan once, and it is the fastest here: one query
# row against a masked 4096-slot cache, bf16, H200: 12 us at batch 1 against 190 for the memory-efficient kernel
# (bench/decode_attention.py; bench/RESULTS.md, session 18). Not used yet: not checked on a GPU inside a graph.


def reserve_cache(state: State, size: int, like: torch.Tensor | None = None) -> State:
    """Grow a decoder KV cache (in place) until it holds ``size`` positions, doubling its capacity; what is written
    is kept. ``like`` (a new key) sets the dtype of the first allocation (the projections' dtype, e.g. under
    autocast). New slots are zeros and padding, so reading the whole buffer under its mask is also exact."""
    k, v, pad = state["k"], state["v"], state["pad"]
    cap, n = k.shape[2], state["length"]
    if size <= cap:
        return state
    new_cap = max(cap, MIN_CAPACITY)
    while new_cap < size:
        new_cap *= 2
    dtype = like.dtype if cap == 0 and like is not None else k.dtype  # (an empty cache may change dtype)
    B, H, _, d = k.shape
    state["k"], state["v"] = k.new_zeros(B, H, new_cap, d, dtype=dtype), v.new_zeros(B, H, new_cap, d, dtype=dtype)
    state["pad"] = pad.new_ones(B, new_cap)
    state["k"][:, :, :n], state["v"][:, :, :n], state["pad"][:, :n] = k[:, :, :n], v[:, :, :n], pad[:, :n]
    return state


def cached_kv(state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, v, pad) of the positions written so far (views, no copy); a cross-attention state is returned whole."""
    if "length" not in state:
        return state["k"], state["v"], state["pad"]
    n = state["length"]
    return state["k"][:, :, :n], state["v"][:, :, :n], state["pad"][:, :n]


@register("softmax")
class SoftmaxAttention(Attention):
    # the decode step reads the whole cache under its mask and takes its write slot from ``length`` even when that
    # is a device tensor, so CUDA graphs can replay it (decoding/graphs.py); top-k's step reads the first
    # ``length`` slots, whose shape changes with every token (the state's graph_step entry tells the wrapper)
    graph_step = True

    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, n_heads, role, dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        src = x if memory is None else memory
        q, k, v = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(src)), self.split_heads(self.v_proj(src))
        if key_padding_mask is None and self.causal:  # let SDPA pick its causal flash path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            mask = sdpa_mask(key_padding_mask, q.shape[2], k.shape[2], self.causal, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(y))

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        p = self.q_proj.weight
        if self.role == "cross":
            self.check_inputs(memory[:, :1], memory, memory_padding_mask)
            B, S, _ = memory.shape
            mask = memory_padding_mask if memory_padding_mask is not None else \
                torch.zeros(B, S, dtype=torch.bool, device=memory.device)
            return State(k=self.split_heads(self.k_proj(memory)), v=self.split_heads(self.v_proj(memory)), pad=mask)
        if self.role != "decoder":
            raise ValueError("encoder self-attention is bidirectional and has no incremental form")
        H, d = self.n_heads, self.head_dim
        return State(k=p.new_zeros(batch_size, H, 0, d), v=p.new_zeros(batch_size, H, 0, d),
                     pad=torch.ones(batch_size, 0, dtype=torch.bool, device=p.device), length=0,
                     graph_step=self.graph_step)

    def append_kv(self, x, state, pad=None) -> State:
        """Decoder role: write the keys and values of ``x`` (B, T, D) into the cache after the ``length`` written
        ones, in place; ``pad`` (B, T) marks padding tokens (kept out of attention). Cross: the state, unchanged."""
        if self.role != "decoder":
            return state
        k, v = self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))
        n, T = state["length"], x.shape[1]
        if torch.is_tensor(n):  # a CUDA-graph replay (decoding/graphs.py), which made room first
            slots = n + torch.arange(T, device=n.device)
            state["k"].index_copy_(2, slots, k.to(state["k"].dtype))
            state["v"].index_copy_(2, slots, v.to(state["v"].dtype))
            state["pad"].index_copy_(1, slots, pad if pad is not None else state["pad"].new_zeros(x.shape[0], T))
        else:
            reserve_cache(state, n + T, like=k)
            state["k"][:, :, n:n + T], state["v"][:, :, n:n + T] = k, v
            state["pad"][:, n:n + T] = False if pad is None else pad
        state["length"] = n + T
        return state

    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))
        state = self.append_kv(x, state, None if pad is None else pad[:, None])
        # the whole buffer under its mask (unwritten slots are zeros and masked: the same numbers as reading the
        # first `length`), so shapes change only when the capacity doubles: SDPA backends that plan per shape
        # (cuDNN) would otherwise re-plan every step, and CUDA graphs need static shapes
        k, v, mask = state["k"], state["v"], state["pad"]
        mask = ~mask[:, None, None, :] | (mask.all(-1)[:, None, None, None])
        with sdpa_kernel(STEP_BACKENDS):
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.out_proj(self.merge_heads(y)), state

    def prefill(self, x, state, key_padding_mask=None):
        if self.role != "decoder":  # cross: the T queries read the source at once; the state is read-only
            return self.step(x, state)
        n0, T = state["length"], x.shape[1]
        q = self.split_heads(self.q_proj(x))
        state = self.append_kv(x, state, key_padding_mask)
        k, v, pad = cached_kv(state)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if n0 == 0 and key_padding_mask is None:  # a fresh prompt: SDPA's causal (flash) path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries are the last T of n0 + T positions
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(pad, T, n0 + T, True, x.device))
        return self.out_proj(self.merge_heads(y)), state
