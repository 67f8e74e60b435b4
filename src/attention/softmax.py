"""Softmax attention through PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU); decoding keeps a KV cache, so a step costs O(t) and the state grows with t."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


@register("softmax")
class SoftmaxAttention(Attention):
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
                     pad=torch.zeros(batch_size, 0, dtype=torch.bool, device=p.device))

    def append_kv(self, x, state, pad=None) -> State:
        """Decoder role: the KV cache with the new token's key and value appended (cross: unchanged)."""
        if self.role != "decoder":
            return state
        k, v = self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))
        if pad is None:
            pad = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return State(k=torch.cat([state["k"], k], 2), v=torch.cat([state["v"], v], 2),
                     pad=torch.cat([state["pad"], pad[:, None]], 1))

    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))
        state = self.append_kv(x, state, pad)
        mask = state["pad"]
        mask = ~mask[:, None, None, :] | (mask.all(-1)[:, None, None, None])
        y = F.scaled_dot_product_attention(q, state["k"], state["v"], attn_mask=mask)
        return self.out_proj(self.merge_heads(y)), state
