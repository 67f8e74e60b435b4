"""Acoustic models for CTC speech recognition: a Transformer encoder over filterbank features, and the
bidirectional LSTM baseline of "Transformers are RNNs" (Katharopoulos et al., 2020, Table 3).

Both map ``features (B, T, F), lengths (B,)`` to ``log_probs (B, T', V), lengths (B,)``: per-frame
log-probabilities over the CTC labels (index 0 = blank) after the front end's subsampling (T' ~ T / 4 with two
stride-2 convolutions), and the number of valid output frames per sequence.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Positions, TransformerEncoder


class ConvSubsampler(nn.Module):
    """``n_layers`` 1-d convolutions over time, stride 2 each (kernel 3, GELU): T -> ~T / 2**n_layers."""

    def __init__(self, input_dim: int, d_model: int, n_layers: int = 2, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.convs = nn.ModuleList(
            nn.Conv1d(input_dim if i == 0 else d_model, d_model, kernel_size, stride=2, padding=kernel_size // 2)
            for i in range(n_layers))

    def _next_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        return torch.div(lengths + 2 * p - self.kernel_size, 2, rounding_mode="floor") + 1

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for _ in self.convs:
            lengths = self._next_lengths(lengths)
        return lengths

    def forward(self, x, lengths):
        # Frames past each sequence's end are zeroed before every convolution, so an utterance gives the same
        # outputs alone as padded in a batch (the kernel at its last frames sees zeros either way).
        x = x.masked_fill(padding_mask(lengths, x.shape[1])[..., None], 0.0).transpose(1, 2)  # (B, F, T)
        for conv in self.convs:
            x, lengths = F.gelu(conv(x)), self._next_lengths(lengths)
            x = x.masked_fill(padding_mask(lengths, x.shape[2])[:, None, :], 0.0)
        return x.transpose(1, 2), lengths


class FrameStacker(nn.Module):
    """Stack ``stack`` consecutive frames and keep every ``stack``-th (no overlap), then a linear projection."""

    def __init__(self, input_dim: int, d_model: int, stack: int = 4):
        super().__init__()
        self.stack = stack
        self.proj = nn.Linear(input_dim * stack, d_model)

    def output_lengths(self, lengths):
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, x, lengths):
        B, T, F_ = x.shape
        x = x.masked_fill(padding_mask(lengths, T)[..., None], 0.0)  # the last stack: zeros alone or in a batch
        pad = (-T) % self.stack
        x = F.pad(x, (0, 0, 0, pad)).reshape(B, (T + pad) // self.stack, F_ * self.stack)
        return self.proj(x), self.output_lengths(lengths)


def build_frontend(kind: str, input_dim: int, d_model: int, subsample_layers: int = 2, stack: int = 4):
    if kind == "conv":
        return ConvSubsampler(input_dim, d_model, subsample_layers)
    if kind == "stack":
        return FrameStacker(input_dim, d_model, stack)
    if kind == "none":
        return FrameStacker(input_dim, d_model, 1)
    raise ValueError(f"unknown front end {kind!r}; expected 'conv', 'stack' or 'none'")


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (the CTC loss in bf16 would lose the small path probabilities)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, -1)


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool, True at padding (the key_padding_mask convention of the attention modules)."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


class CTCTransformer(nn.Module):
    """Front end (subsampling) + positions -> bidirectional Transformer encoder (any attention variant) -> labels."""

    def __init__(self, attention: Mapping, input_dim: int, vocab_size: int, max_len: int = 4096,
                 d_model: int = 256, n_layers: int = 9, n_heads: int = 6, d_ff: int | None = None,
                 dropout: float = 0.1, norm_first: bool = True, positions: str = "sinusoidal",
                 frontend: str = "conv", subsample_layers: int = 2, stack: int = 4, ffn_topk: int | None = None,
                 ffn_chunk_size: int = 1024):
        super().__init__()
        self.frontend = build_frontend(frontend, input_dim, d_model, subsample_layers, stack)
        self.pos = Positions(positions, max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(attention, None, max_len, d_model, n_layers, n_heads, d_ff, dropout,
                                          norm_first=norm_first, positions=positions, ffn_topk=ffn_topk,
                                          ffn_chunk_size=ffn_chunk_size)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        x, lengths = self.frontend(features, lengths)
        x = self.dropout(x + self.pos(0, x.shape[1]))
        mask = padding_mask(lengths, x.shape[1])
        x = self.encoder(x, mask)
        return log_probs(self.head(x)), lengths


class BLSTM(nn.Module):
    """Bidirectional LSTM acoustic model (the paper's baseline: 3 layers, hidden size 320), no subsampling by
    default (``frontend: none``); ``frontend: conv`` subsamples as the Transformer does."""

    def __init__(self, input_dim: int, vocab_size: int, hidden_size: int = 320, n_layers: int = 3,
                 dropout: float = 0.1, frontend: str = "none", subsample_layers: int = 2, stack: int = 4):
        super().__init__()
        self.frontend = None if frontend == "none" else build_frontend(frontend, input_dim, hidden_size,
                                                                       subsample_layers, stack)
        self.lstm = nn.LSTM(input_dim if self.frontend is None else hidden_size, hidden_size, n_layers,
                            batch_first=True, bidirectional=True, dropout=dropout if n_layers > 1 else 0.0)
        self.head = nn.Linear(2 * hidden_size, vocab_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        x = features
        if self.frontend is not None:
            x, lengths = self.frontend(x, lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return log_probs(self.head(y)), lengths
