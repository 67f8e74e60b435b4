"""Linear attention with the elu+1 feature map (Katharopoulos et al., 2020, "Transformers are RNNs").

Causal decoding is an RNN whose state per head is S = sum phi(k) v^T (m x d) and z = sum phi(k) (m): constant in
length. There is no attention matrix, so there is nothing for attention dropout to drop.

Other feature maps (Performer's random features) subclass this and override ``features``."""
from __future__ import annotations

import torch
from torch import nn

from attnlab.kernels.linear_attn import linear_attention, linear_attention_step
from attnlab.kernels.linear_attn.reference import feature

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

    def features(self, x: torch.Tensor, is_query: bool) -> tuple[torch.Tensor, str | None]:
        """(B, H, T, d) projections -> (input to the op, the feature map the op applies). elu+1 is left to the op:
        its Triton path maps q and k in one pass and keeps the features for the backward (kernels/linear_attn)."""
        return x, "elu1"

    def mapped(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """phi(x), materialised (for the state summaries)."""
        x, fmap = self.features(x, is_query)
        return feature(x, fmap)

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        src = x if memory is None else memory
        (q, fmap), (k, _) = self.features(self.split_heads(self.q_proj(x)), True), \
            self.features(self.split_heads(self.k_proj(src)), False)
        v = self.split_heads(self.v_proj(src))
        amp = torch.is_autocast_enabled(x.device.type)
        if not amp:  # under autocast the op takes q, k, v in the autocast dtype itself (kernels/__init__.py)
            v = v.to(q.dtype)
        y = linear_attention(q, k, v, causal=self.causal, eps=self.eps, feature_map=fmap,
                             key_padding_mask=key_padding_mask, backend=self.backend)
        # under autocast y is already in the dtype out_proj computes in: no round trip through float32
        return self.out_proj(self.merge_heads(y) if amp else self.merge_heads(y).to(x.dtype))

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        if self.role == "cross":  # the source summary is computed once: S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)
            self.check_inputs(memory[:, :1], memory, memory_padding_mask)
            k = self.mapped(self.split_heads(self.k_proj(memory)), False)
            v = self.split_heads(self.v_proj(memory)).to(k.dtype)
            if memory_padding_mask is not None:
                k = k.masked_fill(memory_padding_mask[:, None, :, None], 0.0)
            return State(S=torch.einsum("bhsm,bhse->bhme", k, v), z=k.sum(2))
        if self.role != "decoder":
            raise ValueError("encoder self-attention is bidirectional and has no incremental form")
        probe = self.mapped(self.q_proj.weight.new_zeros(1, 1, 1, self.head_dim), False)  # feature width, dtype
        m = probe.shape[-1]
        return State(S=probe.new_zeros(batch_size, self.n_heads, m, self.head_dim),
                     z=probe.new_zeros(batch_size, self.n_heads, m))

    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))[:, :, 0]
        if self.role == "cross":
            qf = self.mapped(q, True)
            y = torch.einsum("bhm,bhme->bhe", qf, state["S"])
            y = y / (torch.einsum("bhm,bhm->bh", qf, state["z"]).unsqueeze(-1) + self.eps)
        else:
            (q, fmap), (k, _) = self.features(q, True), self.features(self.split_heads(self.k_proj(x))[:, :, 0], False)
            v = self.split_heads(self.v_proj(x))[:, :, 0].to(q.dtype)
            y, S, z = linear_attention_step(q, k, v, state["S"], state["z"], eps=self.eps, feature_map=fmap,
                                            write=None if pad is None else ~pad, backend=self.backend)
            state = State(S=S, z=z)
        return self.out_proj(y.to(x.dtype).unsqueeze(1).flatten(2)), state

    def prefill(self, x, state, key_padding_mask=None):
        """A prompt through the parallel (chunked / Triton) op; the state after it is a plain reduction over the
        prompt: S += sum_j phi(k_j) v_j^T, z += sum_j phi(k_j) (padding left out), summed in the state's dtype."""
        q = self.split_heads(self.q_proj(x))
        if self.role == "cross":  # the T queries read the source summary at once
            qf = self.mapped(q, True)
            num = torch.einsum("bhtm,bhme->bhte", qf, state["S"].to(qf.dtype))
            y = num / (torch.einsum("bhtm,bhm->bht", qf, state["z"].to(qf.dtype)).unsqueeze(-1) + self.eps)
            return self.out_proj(self.merge_heads(y).to(x.dtype)), state
        if x.shape[1] == 0 or bool(state["z"].any()):  # a state holding keys: the op takes no initial state, so step
            return super().prefill(x, state, key_padding_mask)
        (q, fmap), (k, _) = self.features(q, True), self.features(self.split_heads(self.k_proj(x)), False)
        v = self.split_heads(self.v_proj(x))
        amp = torch.is_autocast_enabled(x.device.type)
        y = linear_attention(q, k, v if amp else v.to(q.dtype), causal=True, eps=self.eps, feature_map=fmap,
                             key_padding_mask=key_padding_mask, backend=self.backend)  # as in forward
        S, z = state["S"], state["z"]
        with torch.autocast(x.device.type, enabled=False):
            k = feature(k.to(S.dtype), fmap)
            if key_padding_mask is not None:
                k = k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
            S, z = S + torch.einsum("bhtm,bhte->bhme", k, v.to(S.dtype)), z + k.sum(2)
        return self.out_proj(self.merge_heads(y) if amp else self.merge_heads(y).to(x.dtype)), State(S=S, z=z)
