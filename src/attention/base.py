"""The one interface every attention variant implements.

An attention module maps hidden states to hidden states for one *role*:

- ``"encoder"``: bidirectional self-attention,
- ``"decoder"``: causal self-attention (also used by decoder-only language models),
- ``"cross"``:   decoder queries attend to an encoder memory.

It owns its projections (MemSizer, for one, has no key projection at all), so the model only ever calls

    y = attn(x, memory=None, key_padding_mask=None)            # parallel (training) form
    state = attn.init_state(batch_size, memory=..., memory_padding_mask=...)
    y_t, state = attn.step(x_t, state, pad=None)                # incremental (decoding) form
    y, state = attn.prefill(x, state, key_padding_mask=None)    # a prompt at once: = stepping through it
    state = state.reorder(beam_index)                           # beam search

Masks follow ``torch.nn.MultiheadAttention``: a boolean ``key_padding_mask`` of shape (B, S), True where the
key is padding and must be ignored.
"""
from __future__ import annotations

import torch
from torch import nn

ROLES = ("encoder", "decoder", "cross")


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


class State(dict):
    """Decoding state of one attention module: named tensors whose first dimension is the batch.

    Non-tensor entries (step counters, flags) are shared by every batch row.
    """

    def reorder(self, index: torch.Tensor) -> "State":
        """Select/duplicate batch rows, as beam search does after each step."""
        return State({k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in self.items()})


class Attention(nn.Module):
    """Base class. Subclasses set ``roles`` to the roles they support and implement the three methods."""

    roles: tuple[str, ...] = ROLES

    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0):
        super().__init__()
        if role not in ROLES:
            raise ConfigError(f"unknown attention role {role!r}; expected one of {ROLES}")
        if role not in self.roles:
            raise ConfigError(
                f"attention {type(self).name!r} supports the roles {self.roles} but was asked for {role!r} "
                f"({_ROLE_WORDS[role]}). Fix: choose another variant for that role, e.g. "
                f"`attention.{role}.name=softmax`, or a task/model that does not need it."
            )
        if d_model % n_heads:
            raise ConfigError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.role, self.dropout = d_model, n_heads, role, dropout
        self.head_dim = d_model // n_heads

    name: str = "base"  # set by @register

    @property
    def causal(self) -> bool:
        return self.role == "decoder"

    # -- parallel form --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # -- incremental form -----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, memory: torch.Tensor | None = None,
                   memory_padding_mask: torch.Tensor | None = None) -> State:
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: State, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """One new token ``x`` of shape (B, 1, D). ``pad`` (B,) marks rows whose token is padding: their key is
        not added to the state (their output is still computed, and ignored by the caller). The state passed in
        may be updated in place (softmax's preallocated KV cache is): use the returned one, and branch with
        ``reorder``, which copies."""
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, state: State, key_padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, State]:
        """Feed a whole prompt ``x`` (B, T, D) at once: its T outputs and the state that stepping through it token
        by token would reach (``key_padding_mask`` (B, T) as ``step``'s ``pad``, per position). ``state`` comes
        from ``init_state`` or earlier steps; like ``step``, the state passed in may be updated in place, so use
        the returned one. This default is that step loop; variants with a parallel form override it to compute
        the prompt in one pass (same numbers, up to rounding)."""
        B, T, _ = x.shape
        ys, kpm = [], key_padding_mask
        for t in range(T):
            y, state = self.step(x[:, t:t + 1], state, pad=None if kpm is None else kpm[:, t])
            ys.append(y)
        return (torch.cat(ys, 1) if ys else x.new_zeros(B, 0, self.d_model)), state

    # -- shared checks ----------------------------------------------------------------------------------------
    def check_inputs(self, x: torch.Tensor, memory: torch.Tensor | None, key_padding_mask: torch.Tensor | None):
        """Validate shapes once, with messages that name the fix."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{self.name}: expected x of shape (batch, time, {self.d_model}), got {tuple(x.shape)}")
        if self.role == "cross":
            if memory is None:
                raise ValueError(f"{self.name}: cross-attention needs `memory` (the encoder output)")
            if memory.dim() != 3 or memory.shape[0] != x.shape[0] or memory.shape[-1] != self.d_model:
                raise ValueError(f"{self.name}: memory of shape {tuple(memory.shape)} does not match x "
                                 f"{tuple(x.shape)}; expected (batch, source_len, {self.d_model})")
        elif memory is not None:
            raise ValueError(f"{self.name}: role {self.role!r} is self-attention and takes no `memory`")
        keys = memory if memory is not None else x
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != keys.shape[:2]:
                raise ValueError(
                    f"{self.name}: key_padding_mask must be a bool tensor of shape (batch, key_len) = "
                    f"{tuple(keys.shape[:2])} with True at padding; got {key_padding_mask.dtype} "
                    f"{tuple(key_padding_mask.shape)}")

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, H*d) -> (B, H, T, d)."""
        B, T, D = t.shape
        return t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

    @staticmethod
    def merge_heads(t: torch.Tensor) -> torch.Tensor:
        """(B, H, T, d) -> (B, T, H*d)."""
        B, H, T, d = t.shape
        return t.transpose(1, 2).reshape(B, T, H * d)

    def extra_repr(self) -> str:
        return f"role={self.role}, d_model={self.d_model}, n_heads={self.n_heads}"


_ROLE_WORDS = {"encoder": "bidirectional self-attention", "decoder": "causal self-attention",
               "cross": "cross-attention"}
