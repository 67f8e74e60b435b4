"""Decoding library: greedy, sampling and beam search over any model with ``init_state / step / reorder_state``
(and optionally ``prefill``); independent of Lightning and of the attention variants. See ``search.py``."""
from .search import Hypothesis, Recompute, beam_search, filter_logits, greedy, sample, start

__all__ = ["Hypothesis", "Recompute", "beam_search", "filter_logits", "greedy", "sample", "start"]
