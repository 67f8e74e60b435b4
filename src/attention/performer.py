"""Performer FAVOR+ attention (Choromanski et al., ICLR 2021, "Rethinking Attention with Performers").

Softmax attention with exp(q.k / sqrt(d)) replaced by an unbiased positive random-feature estimate phi(q).phi(k):

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   x' = x / d^(1/4),   W: m x d orthogonal random features

(blocks of d orthogonal rows, each row rescaled to the norm of a Gaussian vector). The attention is then linear
attention with these features, computed by ``kernels.linear_attn`` (the same parallel / recurrent ops, and Triton
kernels, as "linear"): training O(T m d), decoding an RNN with an m x d state per head.

Stabilizers: a query's features are divided by their largest entry (a per-query constant: it cancels between
numerator and denominator). Keys get no data-dependent stabilizer: the usual one (the max over all keys) makes a
causal output depend on future keys and could not be reproduced step by step. Key features cannot overflow anyway
(W k' - |k'|^2/2 <= |w|^2/2 ~ d/2); very large keys underflow to 0 and are then ignored, never NaN.

``redraw`` = N > 0 draws new features every N training forward calls (never in eval); the features are a buffer,
so a checkpoint decodes with the features it was last trained with.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.linear_attn import linear_attention, linear_attention_step

from . import register
from .base import Attention, ConfigError, State


def orthogonal_features(m: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(m, d) random features: stacked d x d orthogonal blocks, rows rescaled to chi(d)-distributed norms."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, device=device, dtype=torch.float32))
        blocks.append(qmat.T)
    w = torch.cat(blocks, 0)[:m]
    norms = torch.randn(m, d, device=device, dtype=torch.float32).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


def favor_features(x: torch.Tensor, w: torch.Tensor, is_query: bool) -> torch.Tensor:
    """x (..., d) -> positive random features (..., m) with E[phi(q).phi(k)] = exp(q.k / sqrt(d))."""
    x = x * x.shape[-1] ** -0.25
    logits = x @ w.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2
    if is_query:  # per-query constant: cancels in the ratio
        logits = logits - logits.amax(-1, keepdim=True).detach()
    return logits.exp() * w.shape[0] ** -0.5


@register("performer")
class PerformerAttention(Attention):
    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, nb_features: int | None = None,
                 redraw: int = 0, eps: float = 1e-6, bias: bool = True, backend: str = "auto"):
        super().__init__(d_model, n_heads, role, dropout)
        d = self.head_dim
        m = nb_features if nb_features is not None else max(1, round(d * math.log(d)))  # Theta(d log d)
        if m < 1 or redraw < 0:
            raise ConfigError(f"performer: nb_features={nb_features} must be >= 1 and redraw={redraw} >= 0 "
                              f"(0 = never redraw). Fix: e.g. `attention.nb_features=256 attention.redraw=1000`.")
        self.nb_features, self.redraw, self.eps, self.backend = m, redraw, eps, backend
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.register_buffer("features", orthogonal_features(m, d))
        self.calls = 0  # training forwards since the last draw; a host int (no GPU sync), checkpointed below

    def maybe_redraw(self):
        if not (self.training and self.redraw):
            return
        if self.calls >= self.redraw:
            self.features.copy_(orthogonal_features(self.nb_features, self.head_dim, self.features.device))
            self.calls = 0
        self.calls += 1

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]

    def phi(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        # exp() of projections: keep it out of half precision
        with torch.autocast(x.device.type, enabled=False):
            return favor_features(x.to(torch.promote_types(x.dtype, torch.float32)), self.features, is_query)

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        self.maybe_redraw()
        src = x if memory is None else memory
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(src))
        v = self.split_heads(self.v_proj(src))
        qf, kf = self.phi(q, True), self.phi(k, False)
        y = linear_attention(qf, kf, v.to(qf.dtype), causal=self.causal, eps=self.eps, feature_map=None,
                             key_padding_mask=key_padding_mask, backend=self.backend)
        return self.out_proj(self.merge_heads(y.to(v.dtype)))

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        if self.role == "cross":  # the memory summary is computed once: S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)
            self.check_inputs(memory[:, :1], memory, memory_padding_mask)
            kf, v = self.phi(self.split_heads(self.k_proj(memory)), False), self.split_heads(self.v_proj(memory))
            if memory_padding_mask is not None:
                kf = kf.masked_fill(memory_padding_mask[:, None, :, None], 0.0)
            return State(S=torch.einsum("bhsm,bhse->bhme", kf, v.to(kf.dtype)), z=kf.sum(2))
        if self.role != "decoder":
            raise ValueError("encoder self-attention is bidirectional and has no incremental form")
        p = self.features
        H, d, m = self.n_heads, self.head_dim, self.nb_features
        dtype = torch.promote_types(self.q_proj.weight.dtype, torch.float32)
        return State(S=p.new_zeros(batch_size, H, m, d, dtype=dtype), z=p.new_zeros(batch_size, H, m, dtype=dtype))

    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))[:, :, 0]
        qf = self.phi(q, True)
        if self.role == "cross":
            y = torch.einsum("bhm,bhme->bhe", qf, state["S"])
            y = y / (torch.einsum("bhm,bhm->bh", qf, state["z"]).unsqueeze(-1) + self.eps)
        else:
            k, v = self.split_heads(self.k_proj(x))[:, :, 0], self.split_heads(self.v_proj(x))[:, :, 0]
            y, S, z = linear_attention_step(qf, self.phi(k, False), v.to(qf.dtype), state["S"], state["z"],
                                            eps=self.eps, feature_map=None, write=None if pad is None else ~pad,
                                            backend=self.backend)
            state = State(S=S, z=z)
        return self.out_proj(y.to(x.dtype).unsqueeze(1).flatten(2)), state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nb_features={self.nb_features}, redraw={self.redraw}"
