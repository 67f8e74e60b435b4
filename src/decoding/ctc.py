"""CTC decoding: greedy (best path) and prefix beam search.

Both take log-probabilities over ``V`` labels with ``blank`` the CTC blank. Greedy picks the best label per frame,
merges repeats and drops blanks: the most likely *alignment*, not the most likely *labelling*. Prefix beam search
(Graves 2012; Hannun et al. 2014) keeps, for each candidate labelling, the probability of all its alignments that
end in a blank and of those that end in its last label, so alignments that collapse to the same labelling add up.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0) -> list[list[int]]:
    """log_probs (B, T, V), lengths (B,) valid frames -> one label list per sequence."""
    best = log_probs.argmax(-1).cpu()
    T = best.shape[1]
    lengths = [T] * best.shape[0] if lengths is None else lengths.tolist()
    out = []
    for row, n in zip(best.tolist(), lengths):
        labels, prev = [], None
        for c in row[:n]:
            if c != prev and c != blank:
                labels.append(c)
            prev = c
        out.append(labels)
    return out


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def prefix_beam_search(log_probs: torch.Tensor, beam_size: int = 8, blank: int = 0,
                       prune: float | None = None) -> list[tuple[tuple[int, ...], float]]:
    """log_probs (T, V) of one sequence -> up to ``beam_size`` (labelling, log-probability) pairs, best first.

    ``prune``: per frame, only labels with log-probability >= ``prune`` extend a prefix (None: all labels;
    speeds up large vocabularies at a small risk of dropping a labelling).
    """
    lp = log_probs.detach().to(torch.float64).cpu()
    NEG = -math.inf
    beams = {(): (0.0, NEG)}  # prefix -> (log P(ending in blank), log P(ending in its last label))
    for t in range(lp.shape[0]):
        row = lp[t].tolist()
        labels = range(len(row)) if prune is None else [c for c, v in enumerate(row) if v >= prune or c == blank]
        nxt = defaultdict(lambda: [NEG, NEG])
        for prefix, (pb, pnb) in beams.items():
            total = _logsumexp(pb, pnb)
            for c in labels:
                p = row[c]
                if c == blank:
                    e = nxt[prefix]
                    e[0] = _logsumexp(e[0], total + p)
                    continue
                last = prefix[-1] if prefix else None
                ext = nxt[prefix + (c,)]
                if c == last:
                    # a repeat extends the labelling only after a blank; without one it merges into the prefix
                    ext[1] = _logsumexp(ext[1], pb + p)
                    same = nxt[prefix]
                    same[1] = _logsumexp(same[1], pnb + p)
                else:
                    ext[1] = _logsumexp(ext[1], total + p)
        scored = [(k, v, _logsumexp(*v)) for k, v in nxt.items()]
        # a repeat without a blank before it can create an entry with probability 0: not a candidate
        ranked = sorted((e for e in scored if e[2] > NEG), key=lambda e: e[2], reverse=True)[:beam_size]
        beams = {k: (v[0], v[1]) for k, v, _ in ranked}
    out = [(k, _logsumexp(*v)) for k, v in beams.items()]
    return sorted(out, key=lambda kv: kv[1], reverse=True)


def beam_decode(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, beam_size: int = 8, blank: int = 0,
                prune: float | None = None) -> list[list[int]]:
    """log_probs (B, T, V) -> the best labelling of each sequence by prefix beam search."""
    T = log_probs.shape[1]
    lengths = [T] * log_probs.shape[0] if lengths is None else lengths.tolist()
    return [list(prefix_beam_search(log_probs[b, :n], beam_size, blank, prune)[0][0])
            for b, n in enumerate(lengths)]
