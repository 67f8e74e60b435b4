"""Top-k attention (Gupta et al., 2021, "Memory-efficient Transformers via Top-k Attention").

Each query keeps only its ``k`` largest scores and takes the softmax over those. Queries run in chunks and the
backward recomputes, so training memory is O(chunk * L + L * k) instead of O(L^2). The module is a drop-in for
softmax attention: same projections, same parameter names, same KV cache, so a softmax checkpoint loads unchanged
(with k >= the key length it computes exactly softmax attention)."""
from __future__ import annotations

from attnlab.kernels import BACKENDS
from attnlab.kernels.topk_attn import topk_attention

from . import register
from .base import ConfigError
from .softmax import SoftmaxAttention, cached_kv


@register("topk")
class TopkAttention(SoftmaxAttention):
    graph_step = False  # the step reads the first `length` cache slots (cached_kv): a new shape every token

    def __init__(self, d_model: int, n_heads: int, role: str, dropout: float = 0.0, k: int = 64,
                 chunk_size: int = 1024, backend: str = "auto", bias: bool = True):
        super().__init__(d_model, n_heads, role, dropout, bias)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"topk attention: k (keys kept per query) must be a positive int, got {k!r}; "
                              f"e.g. `attention.k=64`")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"topk attention: chunk_size (queries per chunk) must be a positive int, "
                              f"got {chunk_size!r}; e.g. `attention.chunk_size=1024`")
        if backend not in BACKENDS:
            raise ConfigError(f"topk attention: unknown backend {backend!r}; expected one of {BACKENDS}")
        self.topk, self.chunk_size, self.backend = k, chunk_size, backend

    def forward(self, x, memory=None, key_padding_mask=None):
        self.check_inputs(x, memory, key_padding_mask)
        src = x if memory is None else memory
        q, k, v = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(src)), self.split_heads(self.v_proj(src))
        y = topk_attention(q, k, v, self.topk, self.causal, key_padding_mask, chunk_size=self.chunk_size,
                           dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(self.merge_heads(y))

    # init_state is SoftmaxAttention's: the KV cache (k, v, pad, length) of the tokens so far, or of the source.
    def step(self, x, state, pad=None):
        q = self.split_heads(self.q_proj(x))
        state = self.append_kv(x, state, None if pad is None else pad[:, None])
        k, v, kpad = cached_kv(state)
        # the cache holds only visible keys (past + current), so no causal mask: top-k over the whole cache
        y = topk_attention(q, k.to(q.dtype), v.to(q.dtype), self.topk, False, kpad, chunk_size=self.chunk_size,
                           backend=self.backend)
        return self.out_proj(self.merge_heads(y)), state

    def prefill(self, x, state, key_padding_mask=None):
        if self.role != "decoder":  # cross: the T queries read the source at once; the state is read-only
            return self.step(x, state)
        q = self.split_heads(self.q_proj(x))
        state = self.append_kv(x, state, key_padding_mask)
        k, v, kpad = cached_kv(state)
        # causal with S >= T keys: query i sits at key position i + S - T, after what the cache held before
        y = topk_attention(q, k.to(q.dtype), v.to(q.dtype), self.topk, True, kpad, chunk_size=self.chunk_size,
                           backend=self.backend)
        return self.out_proj(self.merge_heads(y)), state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.topk}, chunk_size={self.chunk_size}, backend={self.backend}"
