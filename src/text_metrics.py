"""Text-generation metrics that reduce exactly across processes: corpus BLEU (sacreBLEU) and ROUGE (rouge-score).

- ``CorpusBLEU``: sacreBLEU's corpus BLEU over detokenized text. Its state is the corpus's sufficient statistics
  (hypothesis and reference lengths, matching and total n-grams for n = 1..4) summed over sentences, batches and
  processes, so the score equals ``sacrebleu.corpus_bleu`` over the whole corpus (not an average of batch scores).
  ``signature()`` is sacreBLEU's signature string (tokenizer, smoothing, version), to report beside the number.
- ``rouge_scores(hyps, refs)``: per-sentence ROUGE-1/2/L/Lsum F-measures (x100) from ``rouge_score``; the module
  keeps their sums and counts in ``Ratio`` metrics (``attnlab.metrics``), i.e. the corpus mean of sentence scores,
  as rouge-score's and the summarization literature's numbers are. ROUGE-Lsum needs one sentence per line: the
  text is split after ``.``, ``!`` or ``?`` followed by a space (nltk's punkt model would need a download).
"""
from __future__ import annotations

import re

import torch
from torchmetrics import Metric

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class CorpusBLEU(Metric):
    """Detokenized corpus BLEU (sacreBLEU, one reference per segment); ``update(hyps, refs)`` with lists of str."""

    full_state_update = False

    def __init__(self, tokenize: str = "13a", lowercase: bool = False, **kwargs):
        super().__init__(**kwargs)
        from sacrebleu.metrics import BLEU
        self.bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
        n = self.bleu.max_ngram_order
        # [hyp_len, ref_len, correct_1..n, total_1..n]: sacreBLEU's per-segment statistics, summed
        self.add_state("stats", torch.zeros(2 + 2 * n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hyps: list[str], refs: list[str]) -> None:
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
        if not hyps:
            return
        stats = self.bleu._extract_corpus_statistics(list(hyps), [list(refs)])
        self.stats += torch.tensor(stats, dtype=torch.float64, device=self.stats.device).sum(0)

    def score(self):
        """sacreBLEU's ``BLEUScore`` of the accumulated corpus (its ``str()`` is the usual one-line report)."""
        n = self.bleu.max_ngram_order
        s = [int(round(v)) for v in self.stats.tolist()]
        return self.bleu.compute_bleu(correct=s[2:2 + n], total=s[2 + n:], sys_len=s[0], ref_len=s[1],
                                      smooth_method=self.bleu.smooth_method, smooth_value=self.bleu.smooth_value,
                                      effective_order=self.bleu.effective_order, max_ngram_order=n)

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.score().score, dtype=torch.float64)

    def signature(self) -> str:
        return str(self.bleu.get_signature())


def split_sentences(text: str) -> str:
    """One sentence per line (what ROUGE-Lsum expects)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


_SCORER = None


def rouge_scores(hyps: list[str], refs: list[str]) -> dict[str, list[float]]:
    """Per-sentence ROUGE F-measures x 100 (rouge-score, Porter stemming), keyed by ``ROUGE_KEYS``."""
    global _SCORER
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out = {k: [] for k in ROUGE_KEYS}
    for h, r in zip(hyps, refs):
        s = _SCORER.score(split_sentences(r), split_sentences(h))  # score(target, prediction)
        for k in ROUGE_KEYS:
            out[k].append(100.0 * s[k].fmeasure)
    return out
