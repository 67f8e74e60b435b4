"""Transformer encoder, decoder and encoder-decoder built from attention configs.

Every attention module comes from ``build_attention(cfg, role, ...)`` with role "encoder" (bidirectional self),
"decoder" (causal self) or "cross", so one config can give each role its own variant. Decoding is token by token
through ``init_state`` / ``step``; the state is a plain dict of per-layer attention states plus the position, and
``reorder_state`` reorders it for beam search.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .adaptive import AdaptiveInput, AdaptiveSoftmax, adaptive_options
from .attention import build_attention


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2, self.dropout = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def build_ffn(d_model: int, d_ff: int, dropout: float, ffn_topk: int | None, ffn_chunk_size: int = 1024):
    if ffn_topk is None:
        return FeedForward(d_model, d_ff, dropout)
    from .topk_ffn import TopkFeedForward  # Gupta et al. 2021: keep the top-k hidden units per token
    return TopkFeedForward(d_model, d_ff, ffn_topk, chunk_size=ffn_chunk_size, dropout=dropout)


class Block(nn.Module):
    """Self-attention (+ cross-attention) + feed-forward, each a residual branch with pre- or post-norm."""

    def __init__(self, attention: Mapping, role: str, d_model: int, n_heads: int, d_ff: int, dropout: float, *,
                 norm_first: bool, cross: bool = False, ffn_topk: int | None = None, ffn_chunk_size: int = 1024,
                 max_len: int | None = None, memory_len: int | None = None):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = build_attention(attention, role, d_model, n_heads, max_len)
        self.cross_attn = build_attention(attention, "cross", d_model, n_heads, memory_len) if cross else None
        self.ffn = build_ffn(d_model, d_ff, dropout, ffn_topk, ffn_chunk_size)
        n_norms = 3 if cross else 2
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_norms))
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x, i, fn):
        if self.norm_first:
            return x + self.dropout(fn(self.norms[i](x)))
        return self.norms[i](x + self.dropout(fn(x)))

    def forward(self, x, key_padding_mask=None, memory=None, memory_padding_mask=None):
        x = self._residual(x, 0, lambda h: self.self_attn(h, key_padding_mask=key_padding_mask))
        if self.cross_attn is not None:
            x = self._residual(x, 1, lambda h: self.cross_attn(h, memory, memory_padding_mask))
        return self._residual(x, len(self.norms) - 1, self.ffn)

    def step(self, x, states: list, pad=None):
        """One token through the block; ``states`` = [self_state(, cross_state)] is updated in place."""
        def self_fn(h):
            y, states[0] = self.self_attn.step(h, states[0], pad=pad)
            return y

        def cross_fn(h):
            y, states[1] = self.cross_attn.step(h, states[1])
            return y

        x = self._residual(x, 0, self_fn)
        if self.cross_attn is not None:
            x = self._residual(x, 1, cross_fn)
        return self._residual(x, len(self.norms) - 1, self.ffn)

    def prefill(self, x, states: list, key_padding_mask=None):
        """A prompt (B, T, D) through the block at once; = T calls of ``step``. ``states`` is updated in place."""
        def self_fn(h):
            y, states[0] = self.self_attn.prefill(h, states[0], key_padding_mask)
            return y

        def cross_fn(h):
            y, states[1] = self.cross_attn.prefill(h, states[1])
            return y

        x = self._residual(x, 0, self_fn)
        if self.cross_attn is not None:
            x = self._residual(x, 1, cross_fn)
        return self._residual(x, len(self.norms) - 1, self.ffn)


class Positions(nn.Module):
    """Sinusoidal (Vaswani et al.) or learned absolute positions, with a hard length limit."""

    def __init__(self, kind: str, max_len: int, d_model: int):
        super().__init__()
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.emb = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.emb.weight, std=1.0)  # the scale of the (sqrt(d)-scaled) token embeddings
        elif kind == "sinusoidal":
            pos = torch.arange(max_len).unsqueeze(1)
            div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
            pe = torch.zeros(max_len, d_model)
            pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)[:, : d_model // 2]
            self.register_buffer("pe", pe, persistent=False)
        else:
            raise ValueError(f"unknown positions {kind!r}; expected 'sinusoidal' or 'learned'")

    def forward(self, start: int | torch.Tensor, length: int) -> torch.Tensor:
        """Positions start .. start+length-1. ``start`` may be a 0-d device tensor (a decode step captured in a CUDA
        graph reads its position from memory); the caller then checks the limit (``check_length``)."""
        table = self.emb.weight if self.kind == "learned" else self.pe
        if isinstance(start, torch.Tensor):
            return table.index_select(0, start + torch.arange(length, device=start.device))
        self.check_length(start + length)
        return table[start:start + length]

    def check_length(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"sequence of length {length} is longer than the model allows "
                             f"(max_len={self.max_len}). Fix: raise `model.net.max_len` (learned positions "
                             f"then need retraining) or shorten the inputs; nothing is truncated silently.")


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, max_len: int, positions: str, dropout: float,
                 adaptive: Mapping | None = None):
        super().__init__()
        if adaptive is None:
            self.tok = nn.Embedding(vocab_size, d_model)
            nn.init.normal_(self.tok.weight, std=d_model ** -0.5)
        else:  # Baevski & Auli: frequency bands of decreasing width, projected to d_model; scaled below as well
            self.tok = AdaptiveInput(vocab_size, d_model, adaptive["cutoffs"], adaptive["factor"])
        self.pos = Positions(positions, max_len, d_model)
        self.scale = d_model ** 0.5
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.dropout(self.tok(tokens) * self.scale + self.pos(start, tokens.shape[1]))


class Stack(nn.Module):
    """N blocks of one role (+ a final norm when pre-norm)."""

    def __init__(self, n_layers: int, role: str, attention, d_model, n_heads, d_ff, dropout, *, norm_first: bool,
                 cross: bool = False, ffn_topk=None, ffn_chunk_size=1024, max_len=None, memory_len=None):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(attention, role, d_model, n_heads, d_ff, dropout, norm_first=norm_first, cross=cross,
                  ffn_topk=ffn_topk, ffn_chunk_size=ffn_chunk_size, max_len=max_len, memory_len=memory_len)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()

    def forward(self, x, key_padding_mask=None, memory=None, memory_padding_mask=None):
        for layer in self.layers:
            x = layer(x, key_padding_mask, memory, memory_padding_mask)
        return self.norm(x)


class TransformerEncoder(nn.Module):
    """Bidirectional encoder over tokens, or over inputs already embedded to d_model when ``vocab_size`` is None
    (speech: ``attnlab.speech`` adds its subsampling front end and positions first)."""

    def __init__(self, attention: Mapping, vocab_size: int | None = None, max_len: int = 1024, d_model: int = 256,
                 n_layers: int = 4, n_heads: int = 8, d_ff: int | None = None, dropout: float = 0.1, *,
                 norm_first: bool = True, positions: str = "sinusoidal", ffn_topk: int | None = None,
                 ffn_chunk_size: int = 1024):
        super().__init__()
        self.embed = Embedding(vocab_size, d_model, max_len, positions, dropout) if vocab_size else nn.Identity()
        self.stack = Stack(n_layers, "encoder", attention, d_model, n_heads, d_ff or 4 * d_model, dropout,
                           norm_first=norm_first, ffn_topk=ffn_topk, ffn_chunk_size=ffn_chunk_size, max_len=max_len)

    def forward(self, tokens, key_padding_mask=None):
        return self.stack(self.embed(tokens), key_padding_mask)


class TransformerDecoder(nn.Module):
    """Causal decoder: a language model when ``cross=False``, the decoder of a seq2seq model when True.

    ``adaptive`` (``attnlab.adaptive``): ``{cutoffs, factor, input, softmax, tie_proj, dropout}`` for adaptive input
    and/or adaptive softmax; ``tie_embeddings`` then ties their bands. With an adaptive softmax every output
    (``forward``, ``prefill``, ``step``) is log-probabilities over the vocabulary, valid logits for cross-entropy and
    decoding alike, and training takes the cheaper ``head.nll(features(tokens), targets)``."""

    def __init__(self, attention: Mapping, vocab_size: int, max_len: int, d_model: int = 256, n_layers: int = 4,
                 n_heads: int = 8, d_ff: int | None = None, dropout: float = 0.1, *, norm_first: bool = True,
                 positions: str = "sinusoidal", tie_embeddings: bool = True, cross: bool = False,
                 ffn_topk: int | None = None, ffn_chunk_size: int = 1024, memory_len: int | None = None,
                 adaptive: Mapping | None = None):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        ad = adaptive_options(adaptive, tie_embeddings) if adaptive is not None else {}
        self.embed = Embedding(vocab_size, d_model, max_len, positions, dropout, ad if ad.get("input") else None)
        self.stack = Stack(n_layers, "decoder", attention, d_model, n_heads, d_ff or 4 * d_model, dropout,
                           norm_first=norm_first, cross=cross, ffn_topk=ffn_topk, ffn_chunk_size=ffn_chunk_size,
                           max_len=max_len, memory_len=memory_len)
        if ad.get("softmax"):
            self.head = AdaptiveSoftmax(vocab_size, d_model, ad["cutoffs"], ad["factor"], ad["dropout"])
            if tie_embeddings:
                self.head.tie(self.embed.tok, proj=ad["tie_proj"])
        else:
            self.head = nn.Linear(d_model, vocab_size, bias=False)
            if tie_embeddings:
                self.head.weight = self.embed.tok.weight

    def features(self, tokens, key_padding_mask=None, memory=None, memory_padding_mask=None):
        """tokens (B, T) -> the last hidden states (B, T, d_model), before the output head."""
        return self.stack(self.embed(tokens), key_padding_mask, memory, memory_padding_mask)

    def forward(self, tokens, key_padding_mask=None, memory=None, memory_padding_mask=None):
        """tokens (B, T) -> logits (B, T, vocab) (log-probabilities with an adaptive softmax)."""
        return self.head(self.features(tokens, key_padding_mask, memory, memory_padding_mask))

    # -- incremental decoding (the model interface of attnlab.decoding) -------------------------------------
    def init_state(self, batch_size: int, memory=None, memory_padding_mask=None) -> dict:
        layers = []
        for layer in self.stack.layers:
            states = [layer.self_attn.init_state(batch_size)]
            if layer.cross_attn is not None:
                states.append(layer.cross_attn.init_state(batch_size, memory, memory_padding_mask))
            layers.append(states)
        return {"layers": layers, "pos": 0}

    def step(self, tokens: torch.Tensor, state: dict, pad=None) -> torch.Tensor:
        """tokens (B,) or (B, 1) -> logits (B, vocab); ``state`` advances in place."""
        x = self.embed(tokens.view(-1, 1), start=state["pos"])
        for layer, states in zip(self.stack.layers, state["layers"]):
            x = layer.step(x, states, pad)
        state["pos"] += 1
        return self.head(self.stack.norm(x))[:, 0]

    def prefill(self, tokens: torch.Tensor, state: dict, key_padding_mask=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) for every position, each attention variant through its parallel
        form where it has one; ``state`` advances in place to where T calls of ``step`` would take it.
        ``key_padding_mask`` (B, T): padding tokens, kept out of the state (as ``step``'s ``pad``)."""
        x = self.embed(tokens, start=state["pos"])
        for layer, states in zip(self.stack.layers, state["layers"]):
            x = layer.prefill(x, states, key_padding_mask)
        state["pos"] += tokens.shape[1]
        return self.head(self.stack.norm(x))

    @staticmethod
    def reorder_state(state: dict, index: torch.Tensor) -> dict:
        return {"layers": [[s.reorder(index) for s in states] for states in state["layers"]], "pos": state["pos"]}

    def reserve_state(self, state: dict, length: int) -> dict:
        """Preallocate every KV cache (softmax / top-k self-attention) for ``length`` positions in all, so that
        decoding never grows it and its shapes stay fixed (CUDA graphs). The cache takes the dtype the projections
        will produce: autocast's when autocast is on. Constant-size states are left alone."""
        from .attention.softmax import reserve_cache
        p = self.head.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        like = p.new_empty(0, dtype=dtype)
        for states in state["layers"]:
            if "length" in states[0]:
                reserve_cache(states[0], length, like)
        return state

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, n_new: int, temperature: float = 0.0, generator=None) -> torch.Tensor:
        """Prefill ``prefix`` (B, T0 >= 1), then sample ``n_new`` tokens (argmax when temperature=0); returns
        (B, T0 + n_new). No EOS handling: see ``attnlab.decoding`` for EOS, top-k / top-p and beam search."""
        from .decoding import greedy, sample  # the decoding library imports nothing from here
        if temperature > 0:
            new = sample(self, prefix, n_new, temperature=temperature, generator=generator)
        else:
            new = greedy(self, prefix, n_new)
        return torch.cat([prefix, new], 1)


class TransformerSeq2Seq(nn.Module):
    """Encoder-decoder with separate length limits for source and target; ``share_embeddings`` ties source, target
    and output embeddings (a joint vocabulary: ``src_vocab_size`` unset or equal to ``vocab_size``)."""

    def __init__(self, attention: Mapping, vocab_size: int, max_source_len: int, max_target_len: int, *,
                 d_model: int = 512, encoder_layers: int = 6, decoder_layers: int = 6, n_heads: int = 8,
                 d_ff: int | None = None, dropout: float = 0.1, norm_first: bool = True, positions: str = "sinusoidal",
                 share_embeddings: bool = True, ffn_topk: int | None = None, ffn_chunk_size: int = 1024,
                 src_vocab_size: int | None = None, pad_id: int | None = None):
        super().__init__()
        src_vocab_size = src_vocab_size or vocab_size
        if share_embeddings and src_vocab_size != vocab_size:
            raise ValueError(f"share_embeddings needs one vocabulary, got source {src_vocab_size} and target "
                             f"{vocab_size}. Fix: a joint dictionary, or `model.net.share_embeddings=false`.")
        self.pad_id, self.max_source_len = pad_id, max_source_len
        common = dict(attention=attention, d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout,
                      norm_first=norm_first, positions=positions, ffn_topk=ffn_topk, ffn_chunk_size=ffn_chunk_size)
        self.encoder = TransformerEncoder(vocab_size=src_vocab_size, max_len=max_source_len, n_layers=encoder_layers,
                                          **common)
        self.decoder = TransformerDecoder(vocab_size=vocab_size, max_len=max_target_len, n_layers=decoder_layers,
                                          cross=True, memory_len=max_source_len, **common)
        if share_embeddings:
            self.encoder.embed.tok.weight = self.decoder.embed.tok.weight

    def forward(self, src, tgt_in, src_padding_mask=None, tgt_padding_mask=None):
        memory = self.encoder(src, src_padding_mask)
        return self.decoder(tgt_in, tgt_padding_mask, memory, src_padding_mask)

    # -- incremental decoding: encode once, then the decoder's state over that memory --------------------------
    # Search: memory = model.encode(src, mask); attnlab.decoding.beam_search(model, bos_column, eos=..., memory=
    # memory, memory_padding_mask=mask, src_len=src.shape[1]).
    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    def encode(self, src: torch.Tensor, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> the encoder memory (B, S, d_model)."""
        return self.encoder(src, src_padding_mask)

    def init_state(self, batch_size: int, memory=None, memory_padding_mask=None) -> dict:
        if memory is None:
            raise ValueError("TransformerSeq2Seq.init_state needs the encoder memory: "
                             "init_state(batch_size, model.encode(src, src_padding_mask), src_padding_mask)")
        return self.decoder.init_state(batch_size, memory, memory_padding_mask)

    def step(self, tokens: torch.Tensor, state: dict, pad=None) -> torch.Tensor:
        return self.decoder.step(tokens, state, pad)

    def prefill(self, tokens: torch.Tensor, state: dict, key_padding_mask=None) -> torch.Tensor:
        return self.decoder.prefill(tokens, state, key_padding_mask)

    reorder_state = staticmethod(TransformerDecoder.reorder_state)

    def reserve_state(self, state: dict, length: int) -> dict:
        return self.decoder.reserve_state(state, length)
