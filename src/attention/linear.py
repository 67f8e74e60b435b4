"""Linear attention with the elu+1 feature map (Katharopoulos et al., 2020, "Transformers are RNNs").

Causal decoding is an RNN whose state per head is S = sum phi(k) v^T (d x d) and z = sum phi(k) (d): constant in
length. There is no attention matrix, so there is nothing for attention dropout to drop."""
from __future__ import annotations

import torch
from torch import nn

from kernels.linear_attn import linear_attention, linear_attention_step
from kernels.linear_attn.reference import elu1

from . import register
from .base import Attention, State


@register("linear")
class LinearAttention(Attention):
    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, eps: float = 1e-6,
                 bias: bool = True, backend: str = "auto"):
        super().__init__(d_model, n_heads, role, dropout)
        self.eps, self.backend = eps, backend
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        src = x if memory is None else memory
        q, k, v = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(src)), self.split_heads(self.v_proj(src))
        y = linear_attention(q, k, v, causal=self.causal, eps=self.eps, key_padding_mask=key_padding_mask,
                             backend=self.backend)
        return self.out_proj(self.merge_heads(y))

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        if self.role == "cross":  # the source summary is computed once: S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)
            self.check_inputs(memory[:, :1], memory, memory_padding_mask)
            k, v = elu1(self.split_heads(self.k_proj(memory))), self.split_heads(self.v_proj(memory))
            if memory_padding_mask is not None:
                k = k.masked_fill(memory_padding_mask[:, None, :, None], 0.0)
            return State(S=torch.einsum("bhsd,bhse->bhde", k, v), z=k.sum(2))
        if self.role != "decoder":
            raise ValueError("encoder self-attention is bidirectional and has no incremental form")
        p = self.q_proj.weight
        H, d = self.n_heads, self.head_dim
        return State(S=p.new_zeros(batch_size, H, d, d), z=p.new_zeros(batch_size, H, d))

    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))[:, :, 0]
        if self.role == "cross":
            qf = elu1(q)
            y = torch.einsum("bhd,bhde->bhe", qf, state["S"])
            y = y / (torch.einsum("bhd,bhd->bh", qf, state["z"]).unsqueeze(-1) + self.eps)
        else:
            k, v = self.split_heads(self.k_proj(x))[:, :, 0], self.split_heads(self.v_proj(x))[:, :, 0]
            y, S, z = linear_attention_step(q, k, v, state["S"], state["z"], eps=self.eps,
                                            write=None if pad is None else ~pad, backend=self.backend)
            state = State(S=S, z=z)
        return self.out_proj(y.unsqueeze(1).flatten(2)), state
