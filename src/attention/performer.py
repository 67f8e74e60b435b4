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

from . import register
from .base import ConfigError
from .linear import LinearAttention


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
class PerformerAttention(LinearAttention):
    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, nb_features: int | None = None,
                 redraw: int = 0, eps: float = 1e-6, bias: bool = True, backend: str = "auto"):
        super().__init__(d_model, n_heads, role, dropout, eps, bias, backend)
        d = self.head_dim
        m = nb_features if nb_features is not None else max(1, round(d * math.log(d)))  # Theta(d log d)
        if m < 1 or redraw < 0:
            raise ConfigError(f"performer: nb_features={nb_features} must be >= 1 and redraw={redraw} >= 0 "
                              f"(0 = never redraw). Fix: e.g. `attention.nb_features=256 attention.redraw=1000`.")
        self.nb_features, self.redraw = m, redraw
        self.register_buffer("features_w", orthogonal_features(m, d))
        self.calls = 0  # training forwards since the last draw; a host int (no GPU sync), checkpointed below

    def maybe_redraw(self):
        if not (self.training and self.redraw):
            return
        if self.calls >= self.redraw:
            self.features_w.copy_(orthogonal_features(self.nb_features, self.head_dim, self.features_w.device))
            self.calls = 0
        self.calls += 1

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]

    def features(self, x, is_query):
        # exp() of projections: keep it out of half precision; the op gets ready-made features
        with torch.autocast(x.device.type, enabled=False):
            return favor_features(x.to(torch.promote_types(x.dtype, torch.float32)), self.features_w, is_query), None

    def forward(self, x, memory=None, key_padding_mask=None):
        self.maybe_redraw()
        return super().forward(x, memory, key_padding_mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nb_features={self.nb_features}, redraw={self.redraw}"
