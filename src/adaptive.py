"""Adaptive input (Baevski & Auli, 2019) and adaptive softmax (Grave et al., 2017), with fairseq's conventions.

Bands: the cutoffs c_1 < ... < c_n split the vocabulary into n + 1 bands [0, c_1), [c_1, c_2), ..., [c_n, V). The
ids must be sorted by decreasing frequency, which fairseq's dictionary (and ``attnlab.tasks.fairseq_data``'s) gives
after its 4 specials: a few frequent words share the first band, the many rare ones the last. Band i is
``d_model // factor**i`` wide: capacity goes where the counts are. As in fairseq (``--adaptive-input-cutoff
20000,60000``) the cutoffs leave out V, which is appended; a cutoff >= V is an error here (fairseq also accepts a last
cutoff equal to V), since the vocabulary usually comes from the data and a silently dropped band would change the model.

- ``AdaptiveInput``: band i is an embedding of width d // factor**i and a linear map (no bias) to d. Initialised as
  fairseq's: embeddings N(0, width**-0.5), projections Xavier-uniform. The decoder multiplies the result by sqrt(d)
  exactly as it does its plain embeddings (fairseq's ``embed_scale`` applies to both). ``padding_idx`` (fairseq's
  zeroed, frozen pad row of band 0) is left unset by the decoder, whose plain embedding has no pad row either.
- ``AdaptiveSoftmax``: the *head* gives c_1 + n logits, the shortlist words [0, c_1) and one logit per *tail
  cluster* (bands 1..n); cluster i maps the hidden state to d // factor**i (dropout) then to its band's words. So
  log p(w) = log p_head(w) in the shortlist, log p_head(cluster of w) + log p_cluster(w | cluster) otherwise: an exact
  distribution over all V words. ``nll`` needs the head for every token but each cluster only on the tokens whose
  target lies in it, never the (tokens, V) matrix; ``forward`` (= ``log_prob``) gives all V log-probabilities, for
  generation; ``predict`` their argmax, one cluster at a time (accuracy, at evaluation only: it costs every cluster
  on every token, and holds the largest band's (tokens, band) log-probabilities at once).
- Tying (fairseq's ``--tie-adaptive-weights`` / ``--tie-adaptive-proj``, ``AdaptiveSoftmax.tie``): band i's
  embedding is the output matrix of the shortlist (i = 0) or of cluster i; with ``proj`` cluster i's first map is band
  i's input projection transposed. Band 0's input projection (d -> d) stays untied, as in fairseq.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ConfigError

# model.net.adaptive: what it may hold and the defaults (fairseq's: factor 4, no dropout, untied projections)
DEFAULTS = {"cutoffs": None, "factor": 4, "input": True, "softmax": True, "tie_proj": False, "dropout": 0.0}


def adaptive_options(adaptive: Mapping, tie_embeddings: bool) -> dict:
    """``model.net.adaptive`` with its defaults filled in, checked against ``tie_embeddings`` (which, with adaptive
    input and softmax, ties their band weights: fairseq's --tie-adaptive-weights)."""
    unknown = sorted(set(adaptive) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"model.net.adaptive: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **adaptive}
    if opts["cutoffs"] is None or isinstance(opts["cutoffs"], (int, str)):
        raise ConfigError(f"model.net.adaptive.cutoffs must be a list of band boundaries, e.g. [20000, 60000] "
                          f"(fairseq's transformer_lm_wiki103), got {opts['cutoffs']!r}")
    if not (opts["input"] or opts["softmax"]):
        raise ConfigError("model.net.adaptive has neither input nor softmax. Fix: `model.net.adaptive=null`")
    both = opts["input"] and opts["softmax"]
    if tie_embeddings and not both:
        raise ConfigError("model.net.tie_embeddings=true ties the adaptive input's bands to the adaptive softmax, so "
                          "it needs both. Fix: `model.net.tie_embeddings=false`, or both `model.net.adaptive.input` "
                          "and `model.net.adaptive.softmax` true")
    if opts["tie_proj"] and not (tie_embeddings and both):
        raise ConfigError("model.net.adaptive.tie_proj=true needs tied adaptive weights (adaptive input and softmax, "
                          "`model.net.tie_embeddings=true`). Fix: `model.net.adaptive.tie_proj=false`")
    return opts


def band_bounds(vocab_size: int, d_model: int, cutoffs, factor: float) -> list[int]:
    """[0, c_1, ..., c_n, V] after checking the cutoffs; errors name the config key."""
    cutoffs = [int(c) for c in cutoffs]
    if not factor >= 1:
        raise ConfigError(f"model.net.adaptive.factor must be >= 1 (band i is d_model // factor**i wide), got {factor}")
    too_big = [c for c in cutoffs if c >= vocab_size]
    if too_big:
        raise ConfigError(f"model.net.adaptive.cutoffs={cutoffs}: {too_big} not below the vocabulary size "
                          f"{vocab_size} (the bands are [0, c_1), ..., [c_last, {vocab_size}); the vocabulary size is "
                          f"appended as fairseq does). Fix: cutoffs below {vocab_size}, or `model.net.adaptive=null`")
    if any(b <= a for a, b in zip([0, *cutoffs], cutoffs)):
        raise ConfigError(f"model.net.adaptive.cutoffs={cutoffs} must be positive and strictly increasing")
    if band_dim(d_model, factor, len(cutoffs)) < 1:
        raise ConfigError(f"model.net.adaptive: the last band would be d_model // factor**{len(cutoffs)} = 0 wide "
                          f"(d_model={d_model}, factor={factor}). Fix: a smaller factor or fewer cutoffs")
    return [0, *cutoffs, vocab_size]


def band_dim(d_model: int, factor: float, i: int) -> int:
    return int(d_model // factor ** i)


class AdaptiveInput(nn.Module):
    """Token ids (...) -> (..., d_model): band i's embedding (width d // factor**i), projected to d_model."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs, factor: float = 4, padding_idx: int | None = None):
        super().__init__()
        self.bounds = band_bounds(vocab_size, d_model, cutoffs, factor)
        self.factor, self.embedding_dim = factor, d_model
        if padding_idx is not None and not 0 <= padding_idx < self.bounds[1]:
            raise ConfigError(f"padding_idx {padding_idx} must lie in the first band [0, {self.bounds[1]})")
        self.embs, self.projs = nn.ModuleList(), nn.ModuleList()
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            dim = band_dim(d_model, factor, i)
            emb = nn.Embedding(hi - lo, dim, padding_idx=padding_idx if i == 0 else None)
            nn.init.normal_(emb.weight, std=dim ** -0.5)
            if i == 0 and padding_idx is not None:
                nn.init.zeros_(emb.weight[padding_idx])
            proj = nn.Linear(dim, d_model, bias=False)
            nn.init.xavier_uniform_(proj.weight)
            self.embs.append(emb)
            self.projs.append(proj)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Every band on every token, masked: no data-dependent shapes (no host sync; decoding steps stay capturable
        # in CUDA graphs), at the cost of the narrow projections on all tokens (band 0's d x d dominates anyway).
        out = 0
        for (lo, hi), emb, proj in zip(zip(self.bounds, self.bounds[1:]), self.embs, self.projs):
            inside = (tokens >= lo) & (tokens < hi)
            x = proj(emb((tokens - lo).clamp(0, hi - lo - 1)))
            out = out + torch.where(inside[..., None], x, 0.0)
        return out


class Transposed(nn.Module):
    """x -> x W for a shared weight W (out, in): fairseq's TiedLinear(weight, transpose=True)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return F.linear(x, self.weight.t())


class AdaptiveSoftmax(nn.Module):
    """Hidden states (..., d_model) -> log-probabilities over the vocabulary, through a head and tail clusters."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs, factor: float = 4, dropout: float = 0.0):
        super().__init__()
        if len(cutoffs) == 0:
            raise ConfigError("an adaptive softmax needs at least one cutoff in model.net.adaptive.cutoffs (without, "
                              "it is the full softmax: `model.net.adaptive.softmax=false`)")
        self.bounds, self.factor = band_bounds(vocab_size, d_model, cutoffs, factor), factor
        c1, n = self.bounds[1], len(self.bounds) - 2
        self.head = nn.Linear(d_model, c1, bias=False)      # the shortlist words (tied: band 0's embedding)
        self.cluster = nn.Linear(d_model, n, bias=False)    # one logit per tail cluster
        # fairseq's head is one (c1 + n, d) Xavier-uniform matrix: the same bound for both parts
        bound = math.sqrt(6 / (d_model + c1 + n))
        nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.uniform_(self.cluster.weight, -bound, bound)
        self.tail = nn.ModuleList()
        for i, (lo, hi) in enumerate(zip(self.bounds[1:], self.bounds[2:]), 1):
            dim = band_dim(d_model, factor, i)
            proj, out = nn.Linear(d_model, dim, bias=False), nn.Linear(dim, hi - lo, bias=False)
            nn.init.xavier_uniform_(proj.weight)
            nn.init.xavier_uniform_(out.weight)
            self.tail.append(nn.Sequential(proj, nn.Dropout(dropout), out))
        self.dropout = nn.Dropout(dropout)  # on the hidden state, before head and tails (fairseq)

    @property
    def weight(self) -> torch.Tensor:
        """The shortlist weight, for code that reads ``net.head.weight`` for a device or dtype."""
        return self.head.weight

    def tie(self, inputs: AdaptiveInput, proj: bool = False) -> None:
        """Share band i's embedding with the shortlist (i = 0) / cluster i's output matrix; with ``proj`` also band
        i's input projection (transposed) with cluster i's first map."""
        if inputs.bounds != self.bounds or inputs.factor != self.factor or \
                inputs.embedding_dim != self.head.in_features:
            raise ConfigError(f"tying needs the adaptive input and softmax to have the same bands and widths: "
                              f"bounds {inputs.bounds} / {self.bounds}, factor {inputs.factor} / {self.factor}")
        self.head.weight = inputs.embs[0].weight  # (c1, d): band 0 is d wide
        for i, tail in enumerate(self.tail, 1):
            tail[2].weight = inputs.embs[i].weight  # (band size, width) both
            if proj:
                tail[0] = Transposed(inputs.projs[i].weight)

    def _head(self, h):
        return torch.cat([self.head(h), self.cluster(h)], -1).log_softmax(-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., V) log-probabilities (each row sums to 1)."""
        h = self.dropout(hidden)
        head, c1 = self._head(h), self.bounds[1]
        tails = [tail(h).log_softmax(-1) + head[..., c1 + i, None] for i, tail in enumerate(self.tail)]
        return torch.cat([head[..., :c1], *tails], -1)

    log_prob = forward

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """-log p(target) per position (targets' shape; 0 where ignore_index), as ``-log_prob(hidden)`` gathered at
        the targets, but each cluster only computed on the tokens whose target it holds."""
        h = self.dropout(hidden.reshape(-1, hidden.shape[-1]))
        t = targets.reshape(-1)
        keep = t != ignore_index
        head, c1 = self._head(h), self.bounds[1]
        col = torch.where(keep, t, 0)  # the head column of each target: the word itself, or its cluster's logit
        for i, (lo, hi) in enumerate(zip(self.bounds[1:], self.bounds[2:])):
            col = torch.where((t >= lo) & (t < hi), c1 + i, col)
        nll = -head.gather(1, col[:, None])[:, 0]
        for (lo, hi), tail in zip(zip(self.bounds[1:], self.bounds[2:]), self.tail):
            j = ((t >= lo) & (t < hi)).nonzero()[:, 0]  # (an empty cluster still runs: every parameter gets a grad)
            lp = tail(h[j]).log_softmax(-1).gather(1, (t[j] - lo)[:, None])[:, 0]
            nll = nll.index_add(0, j, -lp)
        return torch.where(keep, nll, 0.0).view(targets.shape)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax of ``log_prob(hidden)`` (...), one cluster at a time: the (..., V) matrix is never built (only the
        largest band's logits). Ties go to the lower id, as argmax does."""
        h = self.dropout(hidden)
        head, c1 = self._head(h), self.bounds[1]
        best, arg = head[..., :c1].max(-1)
        for i, (lo, tail) in enumerate(zip(self.bounds[1:], self.tail)):
            v, a = tail(h).log_softmax(-1).max(-1)
            v = v + head[..., c1 + i]  # rounding is monotone: = the max of the cluster's log-probabilities
            better = v > best
            best, arg = torch.where(better, v, best), torch.where(better, a + lo, arg)
        return arg
