"""A decoder's step lowered to a few fused kernels per layer: the model for decoding, when speed matters.

At batch 16 a decode step of the CIFAR-10-shaped model (16 layers, d=256) is ~20 kernels per layer, each a few
microseconds of launch and latency around well under a microsecond of work (bench/RESULTS.md: 320 kernels and
~690 us per token even replayed from a CUDA graph). ``Fused(model)`` runs the same step as five launches per
linear-attention layer and four per MemSizer layer, plus one for the embedding:

    linear attention                      ln_linear(LayerNorm_1, [W_q | W_k | W_v]) (one matmul for the three)
                                          the step kernel (state update + read-out, recurrent.py)
                                          ln_linear(W_out) + residual
    MemSizer                              ln_linear(LayerNorm_1, [Phi | W_l | W_r]) (one matmul for the three)
                                          memsizer_decode_: softmaxes, LayerNorms, memory update, read-out,
                                          residual add (MemSizer has no output projection)
    both                                  ln_linear(LayerNorm_2, W_1) + relu;  ln_linear(W_2) + residual

It computes what ``model.step`` computes, in the same dtypes (under autocast: norms, softmax and states in float32,
matmuls in bf16 with their outputs rounded to bf16), up to the order of the sums; the attention states advance in
place. The weights it reads are copies in the compute dtype, the three projections concatenated; a copy is
refreshed when its parameter changes (``sync_weights``; ``CUDAGraphs`` calls it before every replay).

It applies to pre-norm ``TransformerDecoder`` language models whose self-attention is linear attention (elu+1) or
MemSizer and whose feed-forward is the plain relu one, in eval mode; anything else (``unfusable`` says what) is
refused at construction, and a step with a padding mask, in training mode or on tensors without Triton runs the
model's own step. Wrap it in ``CUDAGraphs`` (which does so by default) to replay it from a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import nn

from attnlab.kernels import use_triton
from attnlab.kernels.embed import embed_step
from attnlab.kernels.linear_attn.recurrent import linear_attention_step_
from attnlab.kernels.ln_linear import compute_dtype, ln_linear
from attnlab.kernels.memsizer.decode import memsizer_decode_

from .graphs import Delegate, WeightCopies


def unfusable(model) -> str | None:
    """Why ``Fused(model)`` cannot run ``model``'s step, or None when it can."""
    from attnlab.attention.linear import LinearAttention
    from attnlab.attention.memsizer import MemSizerAttention
    from attnlab.transformer import FeedForward, TransformerDecoder
    if not isinstance(model, TransformerDecoder):
        return f"{type(model).__name__} is not a TransformerDecoder"
    if not isinstance(model.stack.norm, nn.LayerNorm) or not isinstance(model.head, nn.Linear):
        return "the decoder is post-norm or has an adaptive softmax"
    for i, layer in enumerate(model.stack.layers):
        kind = type(layer.self_attn)
        if layer.cross_attn is not None or kind not in (LinearAttention, MemSizerAttention):
            return f"layer {i}: {kind.name!r} attention{' with cross-attention' if layer.cross_attn else ''}"
        if type(layer.ffn) is not FeedForward:
            return f"layer {i}: the feed-forward is {type(layer.ffn).__name__}"
        norms = [*layer.norms] + ([layer.self_attn.ln_l, layer.self_attn.ln_r] if kind is MemSizerAttention else [])
        if any(n.weight is None or n.bias is None for n in norms + [model.stack.norm]):
            return f"layer {i}: a LayerNorm without weight or bias"
    return None


def _ln(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


class Fused(Delegate, nn.Module):
    """``model`` (a ``TransformerDecoder``) for the search functions, its ``step`` run by fused kernels (module
    docstring). ``backend``: "auto" (CUDA tensors) or "triton" (also CPU tensors under TRITON_INTERPRET=1)."""

    def __init__(self, model, backend: str = "auto"):
        super().__init__()
        why = unfusable(model)
        if why is not None:
            raise ValueError(f"Fused: {why}. Fix: decode with the model itself (CUDAGraphs(model) falls back to it "
                             f"on its own)")
        self.model, self.backend = model, backend
        self.max_len = model.max_len
        # what each layer's kernels read, as groups of nn.Linear whose weights (and biases) are concatenated
        self.spec = []
        for layer in model.stack.layers:
            a = layer.self_attn
            if hasattr(a, "w_l"):  # MemSizer
                attn = (("in", (a.phi, a.w_l, a.w_r)),)
            else:  # linear attention
                attn = (("in", (a.q_proj, a.k_proj, a.v_proj)), ("out", (a.out_proj,)))
            self.spec.append((*attn, ("fc1", (layer.ffn.fc1,)), ("fc2", (layer.ffn.fc2,))))
        self.spec.append((("head", (model.head,)),))
        self.slots = [(m, n) for groups in self.spec for _, mods in groups for m in mods
                      for n in ("weight", "bias") if m._parameters.get(n) is not None]
        self.copies, self.dtype = None, None  # WeightCopies of _packed(dtype), made at the first step

    # -- the weight copies ------------------------------------------------------------------------------------
    def _packed(self, dtype) -> list:
        def cat(ts):
            return None if any(t is None for t in ts) else torch.cat([t.detach() for t in ts]).to(dtype)
        return [{name: (cat([m.weight for m in mods]), cat([m.bias for m in mods])) for name, mods in groups}
                for groups in self.spec]

    @property
    def weights(self) -> list:
        return self.copies.tensors

    def sync_weights(self, dtype=None) -> bool:
        """Bring the weight copies up to date (in place when only values changed). False when they had to be made
        anew (first use, another dtype, a parameter object replaced): a captured graph reading them is stale."""
        dtype = dtype or self.dtype
        if dtype is None:
            return False
        if dtype != self.dtype or not self.copies.current():
            self.copies, self.dtype = WeightCopies(self.slots, lambda params: self._packed(dtype)), dtype
            return False
        return True

    # -- the step ---------------------------------------------------------------------------------------------
    def _runs(self, tokens, state, pad) -> bool:
        if pad is not None or self.model.training or not use_triton(self.backend, tokens):
            return False
        return all(t.dtype == torch.float32 and t.is_contiguous()
                   for states in state["layers"] for t in states[0].values() if torch.is_tensor(t))

    def _embed(self, tokens, pos):
        e = self.model.embed
        if type(e.tok) is not nn.Embedding:  # adaptive input: the module's own lookup
            return e(tokens[:, None], start=pos)[:, 0]
        if isinstance(pos, int):
            e.pos.check_length(pos + 1)
        table = e.pos.emb.weight if e.pos.kind == "learned" else e.pos.pe
        return embed_step(tokens, e.tok.weight, e.scale, table, pos, backend=self.backend)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: dict, pad=None) -> torch.Tensor:
        m = self.model
        if not self._runs(tokens, state, pad):
            return m.step(tokens, state, pad)
        x = self._embed(tokens.view(-1), state["pos"])  # (B, D): the residual stream
        cdt = compute_dtype(x, m.head.weight)
        self.sync_weights(cdt)
        kw = dict(backend=self.backend, static_weight=True)  # the copies change only between steps
        for layer, states, w in zip(m.stack.layers, state["layers"], self.weights):
            a, st = layer.self_attn, states[0]
            if "out" in w:  # linear attention: the step kernel on views of the three projections
                B, H, dh = x.shape[0], a.n_heads, a.head_dim
                q, k, v = ln_linear(x, *w["in"], ln=_ln(layer.norms[0]), **kw).view(B, 3, H, dh).unbind(1)
                y = linear_attention_step_(q, k, v, st["S"], st["z"], q.new_empty(B, H, dh), eps=a.eps).view(B, -1)
                x = ln_linear(y, *w["out"], residual=x, **kw)
            else:  # MemSizer: no output projection; its step adds to the residual itself
                proj = ln_linear(x, *w["in"], ln=_ln(layer.norms[0]), **kw)
                x = memsizer_decode_(proj, a.n_heads, _ln(a.ln_l), _ln(a.ln_r), st["S"], st["count"], x)
            h = ln_linear(x, *w["fc1"], ln=_ln(layer.norms[-1]), act="relu", **kw)
            x = ln_linear(h, *w["fc2"], residual=x, **kw)
        state["pos"] += 1
        return ln_linear(x, *self.weights[-1]["head"], ln=_ln(m.stack.norm), **kw)
