"""MemSizer (Zhang & Cai, 2022, "Linearizing Transformer with Key-Value Memory"; authors' code: jcyk/memsizer).

Keys are k learned, input-independent memory slots. Each token reads the slots through per-head distributions
p_t^h = softmax(Phi_h x_t + b_h) (k-way), averaged over the H heads (so the read-out costs one head). Values are
written into a k x d memory by outer products of two normalised projections of the tokens:

    a_j = LayerNorm(W_l x_j)  (k),   v_j = LayerNorm(W_r x_j)  (d),   M_t = c_t^{-1/2} sum_{j <= t} a_j v_j^T
    y_t = mean_h(p_t^h)^T M_t            (no output projection)

c_t counts the non-padded keys seen (causal: j <= t; cross / encoder: the true source length). Decoding is an RNN
with state (sum_j a_j v_j^T, c): k x d per sequence, constant in length; cross-attention's memory is built once
per source in ``init_state``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.kernels.memsizer import memsizer, memsizer_step
from attnlab.kernels.memsizer.reference import inv_sqrt_count

from . import register
from .base import Attention, ConfigError, State


@register("memsizer")
class MemSizerAttention(Attention):
    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, k: int = 32,
                 init_scale_keys: float = 8.0, init_scale_values: float = 8.0, bias: bool = True,
                 backend: str = "auto"):
        """k: memory slots. dropout: on the per-head slot distributions (before averaging), as the authors.
        init_scale_*: Xavier-uniform gain init_scale^{-1/2} for Phi (keys) and for W_l, W_r (values)."""
        super().__init__(d_model, n_heads, role, dropout)
        if k < 1:
            raise ConfigError(f"memsizer: k (memory slots) must be >= 1, got {k}")
        if init_scale_keys <= 0 or init_scale_values <= 0:
            raise ConfigError(f"memsizer: init scales must be > 0, got init_scale_keys={init_scale_keys}, "
                              f"init_scale_values={init_scale_values}")
        self.k, self.backend = k, backend
        self.init_scale_keys, self.init_scale_values = init_scale_keys, init_scale_values
        self.phi = nn.Linear(d_model, n_heads * k, bias=bias)    # the learned keys, H x k slots
        self.w_l = nn.Linear(d_model, k, bias=bias)
        self.w_r = nn.Linear(d_model, d_model, bias=bias)
        self.ln_l, self.ln_r = nn.LayerNorm(k), nn.LayerNorm(d_model)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.phi.weight, gain=self.init_scale_keys ** -0.5)
        for lin in (self.w_l, self.w_r):
            nn.init.xavier_uniform_(lin.weight, gain=self.init_scale_values ** -0.5)
        for lin in (self.phi, self.w_l, self.w_r):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def slots(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> p (B, T, k): the per-head slot distributions, dropped out, averaged over heads."""
        B, T, _ = x.shape
        p = self.phi(x).view(B, T, self.n_heads, self.k).softmax(-1)
        p = F.dropout(p, self.dropout, self.training)
        return p.mean(2)

    def values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) -> a (B, S, k), v (B, S, D)."""
        return self.ln_l(self.w_l(x)), self.ln_r(self.w_r(x))

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        a, v = self.values(x if memory is None else memory)
        return memsizer(self.slots(x), a, v, self.causal, key_padding_mask=key_padding_mask, backend=self.backend)

    def init_state(self, batch_size, memory=None, memory_padding_mask=None):
        if self.role == "cross":  # the source memory is read-only while decoding: build it once
            if memory is None:
                raise ValueError("memsizer: cross-attention init_state needs `memory` (the encoder output)")
            self.check_inputs(memory[:, :1], memory, memory_padding_mask)
            a, v = self.values(memory)
            if memory_padding_mask is not None:
                a = a.masked_fill(memory_padding_mask[..., None], 0.0)
                n = (~memory_padding_mask).sum(1)
            else:
                n = torch.full((memory.shape[0],), memory.shape[1], device=memory.device)
            M = torch.einsum("bsk,bsd->bkd", a, v)
            return State(M=M * inv_sqrt_count(n, M.dtype)[:, None, None])
        if self.role != "decoder":
            raise ValueError("memsizer: encoder self-attention is bidirectional and has no incremental form")
        w = self.w_r.weight
        # the count stays in >= float32: bf16 cannot count past 256
        return State(S=w.new_zeros(batch_size, self.k, self.d_model),
                     count=torch.zeros(batch_size, dtype=torch.promote_types(w.dtype, torch.float32),
                                       device=w.device))

    def step(self, x, state, pad=None):
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.d_model:
            raise ValueError(f"memsizer: step takes one token, x of shape (batch, 1, {self.d_model}); "
                             f"got {tuple(x.shape)}")
        p = self.slots(x)[:, 0]
        if self.role == "cross":
            return torch.einsum("bk,bkd->bd", p, state["M"])[:, None], state
        a, v = self.values(x)
        y, S, count = memsizer_step(p, a[:, 0], v[:, 0], state["S"], state["count"],
                                    write=None if pad is None else ~pad, backend=self.backend)
        return y[:, None], State(S=S, count=count)

    def prefill(self, x, state, key_padding_mask=None):
        """A prompt through the parallel (chunked / Triton) read-out; the state after it is a plain reduction:
        S += sum_j a_j v_j^T and count += the prompt's non-padded tokens."""
        if self.role == "decoder":
            self.check_inputs(x, None, key_padding_mask)
        p = self.slots(x)
        if self.role == "cross":  # the T queries read the source memory at once
            return torch.einsum("btk,bkd->btd", p, state["M"].to(p.dtype)), state
        if x.shape[1] == 0 or bool(state["count"].any()):  # a state holding keys: the op takes none, so step
            return super().prefill(x, state, key_padding_mask)
        a, v = self.values(x)
        y = memsizer(p, a, v, True, key_padding_mask=key_padding_mask, backend=self.backend)
        if key_padding_mask is None:
            n = torch.full_like(state["count"], x.shape[1])
        else:
            a = a.masked_fill(key_padding_mask[..., None], 0.0)
            n = (~key_padding_mask).sum(1).to(state["count"].dtype)
        S = state["S"]
        with torch.autocast(x.device.type, enabled=False):  # the state is summed in its own dtype
            S = S + torch.einsum("btk,btd->bkd", a.to(S.dtype), v.to(S.dtype))
        return y, State(S=S, count=state["count"] + n)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
