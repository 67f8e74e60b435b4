"""Decoding library, independent of Lightning and of the attention variants.

- ``search.py``: greedy, sampling and batched beam search over any model with ``init_state / step / reorder_state``
  (and optionally ``prefill``), and ``Recompute`` (no cache: re-run the parallel form each step).
- ``graphs.py``: ``CUDAGraphs(model)``, the same model with its decode step replayed from a CUDA graph.
- ``ctc.py``: CTC greedy and prefix beam search over per-frame log-probabilities."""
from .ctc import beam_decode, greedy_decode, prefix_beam_search
from .graphs import CUDAGraphs
from .search import Hypothesis, Recompute, beam_search, filter_logits, greedy, sample, start

__all__ = ["CUDAGraphs", "Hypothesis", "Recompute", "beam_search", "filter_logits", "greedy", "sample", "start",
           "greedy_decode", "prefix_beam_search", "beam_decode"]
