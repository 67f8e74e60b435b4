"""Edit-distance error rates for speech recognition: PER (phonemes / any label units), CER, WER.

Each metric keeps two sum states, the edit distance (substitutions + deletions + insertions) and the reference
length, so the rate over a whole split is sum(errors) / sum(reference lengths) and reduces correctly across
processes (a mean of per-batch rates would not).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance between two sequences (unit costs), O(len(ref) * len(hyp)) time, O(len(hyp)) memory."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


class ErrorRate(Metric):
    """sum of edit distances / sum of reference lengths over (hypothesis, reference) pairs.

    ``unit``: "token" compares the given sequences as they are (label ids or phoneme strings: PER);
    "char" compares strings character by character (CER); "word" splits strings on whitespace (WER).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, unit: str = "token", **kwargs):
        super().__init__(**kwargs)
        if unit not in ("token", "char", "word"):
            raise ValueError(f"unknown unit {unit!r}; expected 'token', 'char' or 'word'")
        self.unit = unit
        self.add_state("errors", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _split(self, x):
        if self.unit == "word":
            return x.split() if isinstance(x, str) else list(x)
        return list(x)

    def update(self, hyps: Sequence, refs: Sequence) -> None:
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
        errors = total = 0
        for h, r in zip(hyps, refs):
            r = self._split(r)
            errors += edit_distance(r, self._split(h))
            total += len(r)
        self.errors += errors
        self.total += total

    def compute(self) -> torch.Tensor:
        return self.errors.double() / self.total.clamp_min(1)


def PhonemeErrorRate(**kwargs) -> ErrorRate:
    return ErrorRate("token", **kwargs)


def CharErrorRate(**kwargs) -> ErrorRate:
    return ErrorRate("char", **kwargs)


def WordErrorRate(**kwargs) -> ErrorRate:
    return ErrorRate("word", **kwargs)
