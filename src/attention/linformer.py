"""Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the *length* axis to k rows before softmax attention:

    softmax(Q (E K)^T / sqrt(d)) (F V),   E, F in R^{k x max_len}  (a sequence of length S uses their first S columns)

so training costs O(T k d). E and F are learned per layer, shared by the heads (``share_kv`` also ties F = E).
Mixing positions this way lets every output see every input, so there is no causal form: Linformer supports
"encoder" and "cross" only. Padded keys/values are zeroed before the projection (they add nothing to E K, F V).
Inputs longer than ``max_len`` are an error, never truncated. Cross-attention decodes by projecting the memory
once in ``init_state`` (a k x d state per head); each step is softmax over those k rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import Attention, ConfigError, State


@register("linformer")
class LinformerAttention(Attention):
    roles = ("encoder", "cross")  # projecting along length mixes future positions into every key: no causal form

    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, max_len: int | None = None,
                 k: int = 64, share_kv: bool = False, bias: bool = True):
        super().__init__(d_model, n_heads, role, dropout)
        if max_len is None or max_len < 1:
            raise ConfigError(f"linformer needs `max_len` (the longest key sequence; E and F have one column per "
                              f"position), got {max_len}. Fix: `attention.max_len=<longest source length>`.")
        if k < 1:
            raise ConfigError(f"linformer: projected length k={k} must be >= 1. Fix: e.g. `attention.k=64`.")
        self.max_len, self.k, self.share_kv = max_len, k, share_kv
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj_k = nn.Parameter(torch.empty(k, max_len).uniform_(-k ** -0.5, k ** -0.5))  # the paper's E
        self.proj_v = None if share_kv else nn.Parameter(torch.empty(k, max_len).uniform_(-k ** -0.5, k ** -0.5))

    def project(self, src: torch.Tensor, pad: torch.Tensor | None):
        """src (B, S, D) -> projected keys and values (B, H, k, d)."""
        S = src.shape[1]
        if S > self.max_len:
            raise ValueError(f"linformer: key sequence of length {S} is longer than max_len={self.max_len} "
                             f"(its projections E, F have one column per position). Fix: raise `attention.max_len` "
                             f"(and retrain) or shorten the inputs; nothing is truncated.")
        keys, values = self.k_proj(src), self.v_proj(src)
        if pad is not None:
            keys, values = (t.masked_fill(pad[:, :, None], 0.0) for t in (keys, values))
        proj_v = self.proj_k if self.proj_v is None else self.proj_v  # the paper's F
        keys = self.proj_k[:, :S].to(keys.dtype) @ keys  # (k, S) @ (B, S, D) -> (B, k, D)
        values = proj_v[:, :S].to(values.dtype) @ values
        return self.split_heads(keys), self.split_heads(values)

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        q = self.split_heads(self.q_proj(x))
        k, v = self.project(x if memory is None else memory, key_padding_mask)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(y))

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        if self.role != "cross":
            raise ValueError("linformer self-attention is bidirectional and has no incremental form")
        self.check_inputs(memory[:, :1], memory, memory_padding_mask)
        k, v = self.project(memory, memory_padding_mask)
        return State(k=k, v=v)

    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))
        y = F.scaled_dot_product_attention(q, state["k"], state["v"])
        return self.out_proj(self.merge_heads(y)), state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}, k={self.k}, share_kv={self.share_kv}"
