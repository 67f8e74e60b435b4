"""Output heads for pixels as tokens (Katharopoulos et al., 2020, Sec. 4.2) and the network that carries them.

Every head maps hidden states (..., d_model) to *log-probabilities* (or logits) over the 256 values of one 8-bit
token, so the LM module's cross-entropy is the exact negative log-likelihood and any sampler that draws from a
softmax over the last dimension samples the head's distribution exactly:

- ``softmax``: a linear layer to 256 logits.
- ``dmol``: a mixture of ``n_mixtures`` discretized logistics (Salimans et al., 2017, PixelCNN++), one mixture per
  token. The values 0..255 are mapped to [-1, 1]; value v gets the logistic mass of the bin [x_v - 1/255,
  x_v + 1/255], the end bins extend to -inf / +inf, so the 256 probabilities sum to exactly one.

Channels (CIFAR-10): each colour value is its own token in raster order (R, G, B of a pixel in turn), so the
mixture is per token and the green token already attends to the red value of its pixel. PixelCNN++'s linear coupling
of the channel means is therefore not used: it would duplicate, with a fixed linear form, a dependency the
Transformer models already (and it needs all three channels predicted from one position, which a per-token
autoregressive model does not do).

Bits/dim: with one token per sub-pixel, bits/dim is the mean negative log-likelihood per token divided by ln 2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ConfigError
from .transformer import TransformerDecoder

HEADS = ("softmax", "dmol")


def bits_per_dim(nll_nats: torch.Tensor | float, n_dims: torch.Tensor | float = 1) -> torch.Tensor:
    """Summed negative log-likelihood in nats over ``n_dims`` dimensions -> bits per dimension."""
    return torch.as_tensor(nll_nats, dtype=torch.float64) / (torch.as_tensor(n_dims, dtype=torch.float64)
                                                             * math.log(2))


def dmol_log_probs(logit_weights: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                   n_values: int = 256) -> torch.Tensor:
    """Log-probabilities of every value 0..n_values-1 under a mixture of discretized logistics.

    Parameters have shape (..., K) (K mixture components; ``means`` on the [-1, 1] scale, ``log_scales`` already
    clamped). Returns (..., n_values).

    The mass of one interior bin is sigma(a) - sigma(b) with a = (upper edge - mean) / scale and b = (lower edge -
    mean) / scale. Computed naively it cancels catastrophically in both tails; the identity

        sigma(a) - sigma(b) = sigma(a) * sigma(-b) * (1 - exp(b - a))

    gives its logarithm as logsigmoid(a) + logsigmoid(-b) + log(-expm1(b - a)), stable for any a > b. Here b - a =
    -bin_width / scale is the same for every bin of a component.
    """
    half = 1.0 / (n_values - 1)  # half a bin on the [-1, 1] scale
    # the n_values - 1 edges between consecutive values: x_v + half for v = 0 .. n_values - 2
    edges = torch.linspace(-1 + half, 1 - half, n_values - 1, dtype=means.dtype, device=means.device)
    inv_s = torch.exp(-log_scales)[..., None]                               # (..., K, 1)
    z = (edges - means[..., None]) * inv_s                                  # (..., K, n_values - 1)
    log_width = torch.log(-torch.expm1(-2 * half * inv_s))                  # log(1 - exp(b - a)), (..., K, 1)
    lower = F.logsigmoid(z[..., :1])                                        # v = 0: CDF at its upper edge
    upper = F.logsigmoid(-z[..., -1:])                                      # v = max: 1 - CDF at its lower edge
    inner = F.logsigmoid(z[..., 1:]) + F.logsigmoid(-z[..., :-1]) + log_width
    log_p = torch.cat([lower, inner, upper], dim=-1)                        # (..., K, n_values)
    log_mix = torch.log_softmax(logit_weights, dim=-1)[..., None]
    return torch.logsumexp(log_mix + log_p, dim=-2)


# Both heads are linear layers (with ``weight`` and ``bias`` like the plain LM head they replace, which code that
# looks at ``net.head.weight`` for a device or dtype relies on) followed by their likelihood.
class SoftmaxHead(nn.Linear):
    """A 256-way softmax over the values of one token (returns logits)."""

    def __init__(self, d_model: int, n_values: int = 256):
        super().__init__(d_model, n_values)


class DMoLHead(nn.Linear):
    """Mixture of discretized logistics per token: 3 * n_mixtures numbers (weights, means, log-scales) from the
    hidden state, returned as the exact log-probabilities of the 256 values."""

    def __init__(self, d_model: int, n_values: int = 256, n_mixtures: int = 10, min_log_scale: float = -7.0):
        super().__init__(d_model, 3 * n_mixtures)
        self.n_values, self.n_mixtures, self.min_log_scale = n_values, n_mixtures, min_log_scale

    def params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float32 at least: the mixture math is not safe in bf16 (edges 1/255 apart)
        p = super().forward(h)
        p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        w, mu, log_s = p.chunk(3, dim=-1)
        return w, mu, log_s.clamp_min(self.min_log_scale)  # PixelCNN++'s floor on the scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return dmol_log_probs(*self.params(h), n_values=self.n_values)


def build_head(head: str, d_model: int, n_values: int = 256, n_mixtures: int = 10) -> nn.Module:
    if head == "softmax":
        return SoftmaxHead(d_model, n_values)
    if head == "dmol":
        if n_mixtures < 1:
            raise ConfigError(f"model.net.n_mixtures must be >= 1 for the dmol head, got {n_mixtures}")
        return DMoLHead(d_model, n_values, n_mixtures)
    raise ConfigError(f"unknown image head {head!r}. Fix: `model.net.head=softmax` (256-way softmax) or "
                      f"`model.net.head=dmol` (mixture of `model.net.n_mixtures` discretized logistics)")


class ImageTransformer(TransformerDecoder):
    """Decoder-only Transformer over pixel tokens with an image head.

    ``vocab_size`` is the number of pixel values (256); the embedding has one more row, the start token
    ``vocab_size`` that opens every sequence (``ImageDataModule`` puts it there), which is never predicted. The
    output head predicts only the 256 values, so it is not tied to the embedding.
    """

    def __init__(self, attention, vocab_size: int, max_len: int, head: str = "softmax", n_mixtures: int = 10,
                 tie_embeddings: bool = False, **kwargs):
        if tie_embeddings:
            raise ConfigError("image models predict 256 values but embed 257 tokens (values + start token), so the "
                              "head is not tied to the embedding. Fix: `model.net.tie_embeddings=false`.")
        super().__init__(attention, vocab_size + 1, max_len, tie_embeddings=False, **kwargs)
        self.vocab_size, self.bos, self.head_kind = vocab_size, vocab_size, head
        self.head = build_head(head, self.embed.tok.embedding_dim, vocab_size, n_mixtures)
